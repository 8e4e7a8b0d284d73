// SPDX-License-Identifier: Apache-2.0
//! The audit log: one JSON line per refused request (docs/SYPAS.md §16).
//!
//! ```json
//! {"time":"2026-11-26T12:00:00.123456789Z","kind":"CALL","agent":"a3","vm":"vm9","session":12,
//!  "service":"agent/a1","method":"ping","code":"PERMISSION_DENIED","code_num":48,
//!  "reason":"The session may not call agent/a1/ping."}
//! ```
//!
//! Lines are written by a thread of their own, so a slow disk never holds up
//! routing. If more than 65,536 lines wait, further ones are counted, and the
//! count is written as a `{"kind":"AUDIT_OVERFLOW","dropped":N}` line.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use cell0_proto::ErrorCode;
use serde::Serialize;

const QUEUE: usize = 65_536;

/// Why the audit log cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Opening the file or starting the writer failed.
    #[error("cannot open the audit log {}", .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// One refused request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AuditRecord {
    /// RFC 3339 UTC time.
    pub time: String,
    /// The request's kind: HELLO, REFRESH, CALL, EVENT, SUBSCRIBE...
    pub kind: String,
    /// The agent id (from the session, or from HELLO), if any.
    pub agent: Option<String>,
    /// The VM the connection came from (`host` for the router's own socket).
    pub vm: String,
    /// The session id, once there is one.
    pub session: Option<u64>,
    /// The service called (`event/<topic>` for EVENT and SUBSCRIBE).
    pub service: String,
    /// The method called (`publish`, `subscribe` for events).
    pub method: String,
    /// The error code's name.
    pub code: String,
    /// The error code's number.
    pub code_num: u32,
    /// The refusal's sentence.
    pub reason: String,
}

impl AuditRecord {
    /// A record stamped now.
    #[allow(clippy::too_many_arguments)]
    pub fn now(
        kind: &str,
        agent: Option<&str>,
        vm: &str,
        session: Option<u64>,
        service: &str,
        method: &str,
        code: u32,
        reason: &str,
    ) -> AuditRecord {
        AuditRecord {
            time: rfc3339_now(),
            kind: kind.to_owned(),
            agent: agent.map(str::to_owned),
            vm: vm.to_owned(),
            session,
            service: service.to_owned(),
            method: method.to_owned(),
            code: ErrorCode::from_u32(code)
                .map_or("UNKNOWN", ErrorCode::name)
                .to_owned(),
            code_num: code,
            reason: reason.to_owned(),
        }
    }
}

/// The current time as RFC 3339 UTC (nanoseconds).
pub fn rfc3339_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

/// The audit log's writer handle; cheap to share.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: Option<SyncSender<AuditRecord>>,
    dropped: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl AuditLog {
    /// An audit log that records nothing (refusals still go to `tracing`).
    pub fn disabled() -> AuditLog {
        AuditLog {
            tx: None,
            dropped: Arc::new(AtomicU64::new(0)),
            written: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Appends to `path` (created with mode 0600), from a thread of its own.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let open_err = |source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(open_err)?;
        let (tx, rx) = sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let (d, w) = (dropped.clone(), written.clone());
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || writer(BufWriter::new(file), rx, &d, &w))
            .map_err(open_err)?;
        Ok(AuditLog {
            tx: Some(tx),
            dropped,
            written,
        })
    }

    /// Records a refusal (never blocks).
    pub fn record(&self, rec: AuditRecord) {
        tracing::info!(
            kind = %rec.kind, agent = ?rec.agent, vm = %rec.vm, service = %rec.service,
            method = %rec.method, code = %rec.code, reason = %rec.reason, "refused"
        );
        if let Some(tx) = &self.tx {
            if let Err(TrySendError::Full(_)) = tx.try_send(rec) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

fn writer(
    mut out: BufWriter<std::fs::File>,
    rx: Receiver<AuditRecord>,
    dropped: &AtomicU64,
    written: &AtomicU64,
) {
    let write_one = |out: &mut BufWriter<std::fs::File>, line: String| {
        if let Err(e) = writeln!(out, "{line}") {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    };
    while let Ok(first) = rx.recv() {
        let mut n = 0u64;
        let mut next = Some(first);
        while let Some(rec) = next.take() {
            if let Ok(line) = serde_json::to_string(&rec) {
                write_one(&mut out, line);
                n += 1;
            }
            next = rx.try_recv().ok();
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let line = serde_json::json!({
                "time": rfc3339_now(), "kind": "AUDIT_OVERFLOW", "dropped": lost,
            });
            write_one(&mut out, line.to_string());
        }
        if let Err(e) = out.flush() {
            tracing::error!(error = %e, "cannot flush the audit log");
        }
        written.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.record(AuditRecord::now(
            "CALL",
            Some("a3"),
            "vm9",
            Some(4),
            "agent/a1",
            "ping",
            48,
            "The session may not call agent/a1/ping.",
        ));
        for _ in 0..200 {
            if log.written() == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let rec: AuditRecord = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(rec.code, "PERMISSION_DENIED");
        assert_eq!(rec.agent.as_deref(), Some("a3"));
        assert!(rec.time.ends_with('Z'), "{}", rec.time);
    }
}
