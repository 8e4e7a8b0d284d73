// SPDX-License-Identifier: Apache-2.0
//! The audit log: one JSON line per state-changing API call, appended to
//! `<data>/audit.log` whatever the outcome.
//!
//! `{"time_ms":…,"method":"Create","peer":"…","target":"vm1","code":"Ok","message":"…","revision":12}`

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::json;

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be opened.
    #[error("cannot open the audit log {path}")]
    Open {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The audit log.
pub struct AuditLog {
    file: Mutex<File>,
}

/// One audited call.
pub struct Entry<'a> {
    /// gRPC method.
    pub method: &'a str,
    /// Peer address, if known.
    pub peer: Option<String>,
    /// The VM or node the call names.
    pub target: &'a str,
    /// Outcome.
    pub code: tonic::Code,
    /// Error message or summary.
    pub message: &'a str,
    /// Raft index of the change (0 when none).
    pub revision: u64,
}

impl AuditLog {
    /// Opens `path` for appending.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| AuditError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    /// Appends one line; a failure to write is logged, never fatal.
    pub fn record(&self, e: &Entry<'_>) {
        let line = json!({
            "time_ms": crate::now_ms(),
            "method": e.method,
            "peer": e.peer,
            "target": e.target,
            "code": format!("{:?}", e.code),
            "message": e.message,
            "revision": e.revision,
        });
        let mut text = line.to_string();
        text.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(err) = f.write_all(text.as_bytes()) {
            tracing::warn!(error = %err, "cannot write the audit log");
        }
    }
}

impl AuditLog {
    /// Records the outcome of a call: its status code, and the message of an
    /// error.
    pub fn record_outcome<T>(
        &self,
        method: &str,
        peer: Option<std::net::SocketAddr>,
        target: &str,
        r: &Result<T, tonic::Status>,
        revision: u64,
    ) {
        let (code, message) = match r {
            Ok(_) => (tonic::Code::Ok, ""),
            Err(s) => (s.code(), s.message()),
        };
        self.record(&Entry {
            method,
            peer: peer.map(|p| p.to_string()),
            target,
            code,
            message,
            revision,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.log");
        let a = AuditLog::open(&p).unwrap();
        a.record(&Entry {
            method: "Create",
            peer: None,
            target: "vm1",
            code: tonic::Code::Ok,
            message: "",
            revision: 3,
        });
        a.record(&Entry {
            method: "Delete",
            peer: Some("x".into()),
            target: "vm2",
            code: tonic::Code::NotFound,
            message: "no VM named \"vm2\"",
            revision: 0,
        });
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["method"], "Create");
        assert_eq!(lines[1]["code"], "NotFound");
    }
}
