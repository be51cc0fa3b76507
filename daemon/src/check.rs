//! `--check-config` beyond syntax: what the daemon would trip over at start (or later), found
//! before it starts, all at once, one line per problem naming its key.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};

use crate::tls::{TlsFiles, load_certs, load_key};

/// What a check found: problems (the daemon would fail, or fail its clients) and notes (it
/// would run, with a limitation worth knowing).
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn problem(&mut self, text: impl Into<String>) {
        self.problems.push(text.into());
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// Prints the report (problems on stderr) and returns the exit code: 0 without problems,
    /// 1 with.
    pub fn finish(&self, daemon: &str) -> std::process::ExitCode {
        for note in &self.notes {
            println!("note: {note}");
        }
        for problem in &self.problems {
            eprintln!("{daemon}: {problem}");
        }
        if self.problems.is_empty() {
            println!("configuration is valid");
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::from(1)
        }
    }
}

/// A certificate expiring within this long gets a note.
const EXPIRY_NOTE_DAYS: i64 = 30;

/// Which end of a connection certificates are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// A listener's: also checked to chain to the CA for its subjectAltName, and to match
    /// its key, as a client will check it.
    Server,
    /// A client's (core calling persist).
    Client,
}

/// Certificates as they would be loaded (`section` names them: "grpc.tls"): readable, the
/// key private to its owner, the certificate within its validity period and, for a server,
/// chaining to the CA and matching the key.
pub fn tls(section: &str, files: &TlsFiles, end: End, report: &mut Report) {
    let key_ok = private_file(&format!("{section}.key"), &files.key, report);
    let certs = match load_certs("cert", &files.cert) {
        Ok(certs) => Some(certs),
        Err(error) => {
            report.problem(format!("{section}.{error}"));
            None
        }
    };
    let roots = match load_certs("ca", &files.ca) {
        Ok(cas) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in cas {
                if let Err(error) = roots.add(ca) {
                    report.problem(format!("{section}.ca {}: {error}", files.ca.display()));
                }
            }
            Some(roots)
        }
        Err(error) => {
            report.problem(format!("{section}.{error}"));
            None
        }
    };
    let Some(certs) = certs else { return };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(&certs[0]) else {
        report.problem(format!(
            "{section}.cert {}: not an X.509 certificate",
            files.cert.display()
        ));
        return;
    };
    let now = x509_parser::time::ASN1Time::now();
    let validity = parsed.validity();
    let path = files.cert.display();
    if validity.not_after < now {
        report.problem(format!(
            "{section}.cert {path}: expired on {}",
            validity.not_after
        ));
    } else if validity.not_before > now {
        report.problem(format!(
            "{section}.cert {path}: not valid before {}",
            validity.not_before
        ));
    } else if validity
        .time_to_expiration()
        .is_some_and(|left| left.whole_days() < EXPIRY_NOTE_DAYS)
    {
        report.note(format!(
            "{section}.cert {path}: expires on {}",
            validity.not_after
        ));
    }
    if end == End::Client {
        return;
    }
    let name = subject_alt_name(&parsed);
    if name.is_none() {
        report.problem(format!(
            "{section}.cert {path}: no DNS name or IP address in subjectAltName; clients \
             cannot verify it"
        ));
    }
    if let (Some(roots), Some(name)) = (roots, name) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chained = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())
            .and_then(|verifier| {
                verifier
                    .verify_server_cert(&certs[0], &certs[1..], &name, &[], UnixTime::now())
                    .map_err(|e| e.to_string())
            });
        // Expiry was reported above, in plainer words.
        if let Err(error) = chained
            && !error.contains("expired")
            && !error.contains("not valid yet")
        {
            report.problem(format!(
                "{section}.cert {path}: does not verify against {section}.ca {}: {error}",
                files.ca.display()
            ));
        }
    }
    if key_ok && let Err(error) = crate::tls::server_config(&files.cert, &files.key, &files.ca) {
        report.problem(format!("{section}: {error}"));
    }
}

/// The certificate's first DNS name or IP address, as a client would name the server.
fn subject_alt_name(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Option<ServerName<'static>> {
    use x509_parser::extensions::GeneralName;
    let names = cert.subject_alternative_name().ok().flatten()?;
    names
        .value
        .general_names
        .iter()
        .find_map(|name| match name {
            GeneralName::DNSName(dns) => ServerName::try_from(dns.to_string()).ok(),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => Some(ServerName::from(std::net::IpAddr::from(
                    <[u8; 4]>::try_from(*bytes).ok()?,
                ))),
                16 => Some(ServerName::from(std::net::IpAddr::from(
                    <[u8; 16]>::try_from(*bytes).ok()?,
                ))),
                _ => None,
            },
            _ => None,
        })
}

/// A private key: readable, parsing, and not readable by group or others. Returns whether it
/// loads.
pub fn private_file(key: &str, path: &Path, report: &mut Report) -> bool {
    match std::fs::metadata(path) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => report.problem(format!(
            "{key} {}: readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o7777
        )),
        _ => {}
    }
    match load_key("", path) {
        Ok(_) => true,
        Err(error) => {
            report.problem(format!("{key}{error}"));
            false
        }
    }
}

/// The directory of a Unix socket must not let another user put their socket in its place:
/// not writable by everyone unless sticky (like /tmp). A missing directory is a problem for
/// the side that creates the socket (`required`), a note for the side that connects.
pub fn socket_dir(key: &str, socket: &Path, required: bool, report: &mut Report) {
    let dir = socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(meta) = std::fs::metadata(dir) else {
        let text = format!("{key}: directory {} does not exist", dir.display());
        if required {
            report.problem(text);
        } else {
            report.note(format!("{text} (yet)"));
        }
        return;
    };
    let mode = meta.permissions().mode();
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        report.problem(format!(
            "{key}: directory {} is writable by everyone without the sticky bit; anyone could \
             replace the socket",
            dir.display()
        ));
    }
}

/// A directory the daemon keeps state in: it exists and is writable, or can be created.
pub fn state_dir(key: &str, dir: &Path, report: &mut Report) {
    let existing = dir
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    if !existing.is_dir() {
        report.problem(format!("{key}: {} is not a directory", existing.display()));
    } else if nix::unistd::access(existing, nix::unistd::AccessFlags::W_OK).is_err() {
        report.problem(format!(
            "{key}: {} is not writable{}",
            existing.display(),
            if existing == dir {
                ""
            } else {
                " (to create the directory in)"
            }
        ));
    }
}
