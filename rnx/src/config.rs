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

/// Where the configuration comes from: its path and why that one.
pub fn find(explicit: Option<&Path>) -> Result<(PathBuf, &'static str), String> {
    if let Some(path) = explicit {
        return Ok((path.to_owned(), "--config"));
    }
    if let Some(path) = std::env::var_os("RNX_CONFIG") {
        return Ok((PathBuf::from(path), "RNX_CONFIG is set"));
    }
    let local = PathBuf::from("rnx-config.yml");
    if local.exists() {
        return Ok((local, "in the current directory"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let path = PathBuf::from(home).join(".rnx/rnx-config.yml");
        if path.exists() {
            return Ok((
                path,
                "the per-user default (no --config, RNX_CONFIG or ./rnx-config.yml)",
            ));
        }
    }
    Err("no rnx-config.yml found (looked at --config, RNX_CONFIG, ./rnx-config.yml, ~/.rnx/rnx-config.yml)".into())
}

/// Reads and parses the configuration file at `path`.
pub fn read(path: &Path) -> Result<ConfigFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn load(explicit: Option<&Path>, node: &str) -> Result<Node, String> {
    let (path, _) = find(explicit)?;
    let file = read(&path)?;
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

/// `rnx config show`: which file is used and why, and what each node in it says — never the
/// key itself.
pub fn show(explicit: Option<&Path>) -> Result<String, String> {
    use std::fmt::Write as _;
    use std::os::unix::fs::PermissionsExt;
    let (path, why) = find(explicit)?;
    let file = read(&path)?;
    let mut out = format!("config: {} ({why})\n", path.display());
    for (name, node) in &file.nodes {
        let persist = node
            .persist_address
            .as_deref()
            .unwrap_or("none (history from core only)");
        let _ = writeln!(out, "node {name}: core {}, persist {persist}", node.address);
        match node.cert.as_deref().map(describe_certificate) {
            Some(described) => {
                let _ = writeln!(out, "  mutual TLS: {described}");
            }
            None => {
                let _ = writeln!(out, "  plaintext (no certificate)");
            }
        }
    }
    if file.nodes.values().any(|node| node.key.is_some()) {
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "it holds a private key: {}",
            if mode & 0o077 == 0 {
                format!("readable by its owner only (mode {mode:o}), as it should be")
            } else {
                format!("WARNING: mode {mode:o} lets others read it and act as you; chmod 600 it")
            }
        );
    }
    Ok(out)
}

/// "as <CN> (role <OU>), expires <date>" from a PEM certificate.
fn describe_certificate(pem: &str) -> String {
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(pem.as_bytes()) else {
        return "certificate is not PEM".into();
    };
    let Ok(cert) = pem.parse_x509() else {
        return "certificate does not parse".into();
    };
    let text = |attribute: Option<&x509_parser::x509::AttributeTypeAndValue<'_>>| {
        attribute
            .and_then(|a| a.as_str().ok())
            .unwrap_or("?")
            .to_owned()
    };
    let subject = cert.subject();
    let expires = cert.validity().not_after;
    let expired = if cert.validity().is_valid() {
        "expires"
    } else {
        "EXPIRED or not yet valid:"
    };
    format!(
        "as {} (role {}), {expired} {expires}",
        text(subject.iter_common_name().next()),
        text(subject.iter_organizational_unit().next()),
    )
}
