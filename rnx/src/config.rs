//! `rnx-config.yml`, as Joblet users have it: `nodes.<name>.{address, persistAddress, cert, key,
//! ca, nodeId}`. Looked up from `--config`, `RNX_CONFIG`, `./rnx-config.yml`, then
//! `~/.rnx/rnx-config.yml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct ConfigFile {
    pub nodes: BTreeMap<String, Node>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Node {
    /// joblet-core, host:port.
    pub address: String,
    /// joblet-persist, host:port (optional: without it rnx reads everything from core).
    #[serde(default)]
    pub persist_address: Option<String>,
    #[serde(default)]
    pub cert: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub ca: Option<String>,
    #[serde(default)]
    pub node_id: Option<String>,
}

pub fn find(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    if let Some(path) = std::env::var_os("RNX_CONFIG") {
        return Ok(PathBuf::from(path));
    }
    let local = PathBuf::from("rnx-config.yml");
    if local.exists() {
        return Ok(local);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let path = PathBuf::from(home).join(".rnx/rnx-config.yml");
        if path.exists() {
            return Ok(path);
        }
    }
    Err("no rnx-config.yml found (looked at --config, RNX_CONFIG, ./rnx-config.yml, ~/.rnx/rnx-config.yml)".into())
}

pub fn load(explicit: Option<&Path>, node: &str) -> Result<Node, String> {
    let path = find(explicit)?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let file: ConfigFile =
        serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let names: Vec<&String> = file.nodes.keys().collect();
    let name = node;
    let node = file
        .nodes
        .get(name)
        .cloned()
        .ok_or_else(|| format!("{}: no node {name:?} (nodes: {names:?})", path.display()))?;
    let present = [&node.cert, &node.key, &node.ca]
        .iter()
        .filter(|f| f.is_some())
        .count();
    if present != 0 && present != 3 {
        return Err(format!(
            "{}: node {node:?} needs all of cert, key and ca (PEM text) for mutual TLS, or none for plaintext",
            path.display(),
            node = name
        ));
    }
    Ok(node)
}
