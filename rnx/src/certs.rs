//! `rnx certs init`: a CA, a server certificate, admin and viewer client certificates, core's
//! client certificate for persist, and rnx configs with the client certificates embedded.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::Failure;

#[derive(clap::Args)]
pub struct Options {
    /// Directory to write into.
    #[arg(long)]
    pub out: PathBuf,
    /// Host name or IP the daemons are reached by (repeatable; the first goes into the rnx configs).
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 825)]
    pub days: u32,
    #[arg(long, default_value_t = 50051)]
    pub core_port: u16,
    #[arg(long, default_value_t = 50052)]
    pub persist_port: u16,
    /// Replace an existing CA.
    #[arg(long)]
    pub force: bool,
}

fn failed(what: &str, error: impl std::fmt::Display) -> Failure {
    Failure::Usage(format!("certs: {what}: {error}"))
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), Failure> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| failed(&path.display().to_string(), e))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| failed(&path.display().to_string(), e))
}

/// Valid from yesterday (clock skew between hosts) for `days` days.
fn validity(params: &mut CertificateParams, days: u32) {
    use chrono::Datelike;
    let day = |offset: i64| {
        let date = (chrono::Utc::now() + chrono::Duration::days(offset)).date_naive();
        rcgen::date_time_ymd(date.year(), date.month() as u8, date.day() as u8)
    };
    params.not_before = day(-1);
    params.not_after = day(i64::from(days));
}

fn name(common: &str, unit: Option<&str>) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "joblet");
    if let Some(unit) = unit {
        name.push(DnType::OrganizationalUnitName, unit);
    }
    name.push(DnType::CommonName, common);
    name
}

pub fn init(options: Options) -> Result<(), Failure> {
    std::fs::create_dir_all(&options.out).map_err(|e| failed("create output directory", e))?;
    let ca_path = options.out.join("ca.pem");
    if ca_path.exists() && !options.force {
        return Err(Failure::Usage(format!(
            "certs: {} exists; use --force to replace the CA (every certificate it signed stops working)",
            ca_path.display()
        )));
    }

    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| failed("CA", e))?;
    ca_params.distinguished_name = name("joblet CA", None);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca_params, options.days);
    let ca_key = KeyPair::generate().map_err(|e| failed("CA key", e))?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(|e| failed("CA", e))?;
    write(&ca_path, &ca.pem(), false)?;
    write(&options.out.join("ca-key.pem"), &ca_key_pem, true)?;

    let mut hosts = options.hosts.clone();
    for default in ["localhost", "127.0.0.1"] {
        if !hosts.iter().any(|h| h == default) {
            hosts.push(default.to_owned());
        }
    }
    let leaf = |file: &str,
                common: &str,
                unit: Option<&str>,
                sans: Vec<String>,
                server: bool|
     -> Result<(String, String), Failure> {
        let mut params = CertificateParams::new(sans).map_err(|e| failed(file, e))?;
        params.distinguished_name = name(common, unit);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        validity(&mut params, options.days);
        let key = KeyPair::generate().map_err(|e| failed(file, e))?;
        let cert = params.signed_by(&key, &ca).map_err(|e| failed(file, e))?;
        write(&options.out.join(format!("{file}.pem")), &cert.pem(), false)?;
        write(
            &options.out.join(format!("{file}-key.pem")),
            &key.serialize_pem(),
            true,
        )?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    leaf("server", &hosts[0], None, hosts.clone(), true)?;
    leaf(
        "core-client",
        "joblet-core",
        Some("admin"),
        Vec::new(),
        false,
    )?;
    let admin = leaf("admin", "rnx-admin", Some("admin"), Vec::new(), false)?;
    let viewer = leaf("viewer", "rnx-viewer", Some("viewer"), Vec::new(), false)?;

    let host = &hosts[0];
    for (file, (cert, key)) in [("rnx-config.yml", admin), ("viewer-rnx-config.yml", viewer)] {
        let config = format!(
            "# Written by rnx certs init.\nnodes:\n  default:\n    address: \"{host}:{core}\"\n    persistAddress: \"{host}:{persist}\"\n    cert: |\n{cert}    key: |\n{key}    ca: |\n{ca}",
            core = options.core_port,
            persist = options.persist_port,
            cert = indent(&cert),
            key = indent(&key),
            ca = indent(&ca.pem()),
        );
        write(&options.out.join(file), &config, true)?;
    }
    let out = options.out.display();
    println!(
        "wrote a CA, a server certificate for {hosts}, admin, viewer and core client certificates \
         and rnx configs to {out}:
  ca.pem, server.pem, server-key.pem   both daemons' grpc.tls (the reference configs read them
                                       from /etc/joblet/certs; persist's user must own the key)
  core-client.pem, core-client-key.pem joblet-core's persist.query_tls
  ca-key.pem                           signs new certificates: keep it offline or 0600
  rnx-config.yml                       the admin client: copy to ~/.rnx/rnx-config.yml (or set
                                       RNX_CONFIG) on the machines you run rnx from
  viewer-rnx-config.yml                a read-only client, the same way
The client configs point at {host}:{core} and {host}:{persist}; for remote clients both
daemons' grpc.listen must be an address they can reach (not 127.0.0.1).
warning: rnx-config.yml and viewer-rnx-config.yml hold private keys (written 0600): whoever
reads rnx-config.yml can run any command on the node as root.",
        hosts = hosts.join(", "),
        core = options.core_port,
        persist = options.persist_port,
    );
    Ok(())
}

fn indent(pem: &str) -> String {
    pem.lines().map(|line| format!("      {line}\n")).collect()
}
