// SPDX-License-Identifier: Apache-2.0
//! The router's per-listener HELLO hook (token verification, bound to the
//! listener's VM) and handler (routing CALLs, EVENTs and subscriptions).

use std::sync::Arc;

use bytes::Bytes;
use cell0_proto::ErrorCode;
use cell0_proto::MAX_PAYLOAD;
use cell0_proto::host::{Grant, Handler, HelloHook, ServiceError, Session, SessionCallError};
use cell0_proto::msg::{Body, Call, Event, Hello, Refresh, Reply, ShmRef, permits};

use super::audit::AuditRecord;
use super::guest::{self, NODE_SERVICE};
use super::services::{CallContext, gather};
use super::stats::Target;
use super::{Core, HOST_VM, Origin, Peer, Service};
use crate::token::{ANY_VM, TokenError, valid_name};

/// The service name of the router's own methods.
pub const ROUTER_SERVICE: &str = "router";
/// The prefix of agent addresses.
pub const AGENT_PREFIX: &str = "agent/";
/// The prefix of the rights that cover EVENT topics: `event/<topic>`, with
/// method `publish` or `subscribe`.
pub const EVENT_PREFIX: &str = "event/";

/// Verifies HELLO and REFRESH tokens for one listener.
pub(crate) struct TokenHook {
    pub(crate) core: Arc<Core>,
    pub(crate) origin: Arc<Origin>,
}

impl TokenHook {
    fn check(&self, token: &[u8], agent: &str) -> Result<Grant, ServiceError> {
        let v = self.core.verifier.verify(token).map_err(|e| {
            let code = e.code();
            ServiceError::new(code, sentence(&e))
        })?;
        let c = v.claims;
        if c.agent != agent {
            return Err(ServiceError::new(
                ErrorCode::AgentMismatch,
                format!("The token is for agent {:?}, not {agent:?}.", c.agent),
            ));
        }
        if c.vm != ANY_VM && c.vm != self.origin.vm {
            return Err(ServiceError::new(
                ErrorCode::AgentMismatch,
                format!(
                    "The token is for VM {:?}, but the connection comes from {:?}.",
                    c.vm, self.origin.vm
                ),
            ));
        }
        Ok(Grant {
            rights: c.rights,
            token_expiry: c.expires,
        })
    }

    fn audit(&self, kind: &str, agent: &str, session: Option<u64>, e: &ServiceError) {
        self.core.stats.denial(e.code);
        self.core.audit.record(AuditRecord::now(
            kind,
            Some(agent),
            &self.origin.vm,
            session,
            "",
            "",
            e.code,
            &e.message,
        ));
    }
}

fn sentence(e: &TokenError) -> String {
    let s = e.to_string();
    let mut c = s.chars();
    match c.next() {
        Some(f) => format!("{}{}.", f.to_uppercase(), c.as_str()),
        None => s,
    }
}

impl HelloHook for TokenHook {
    async fn hello(&self, hello: &Hello) -> Result<Grant, ServiceError> {
        let r = if hello.token.is_empty() && self.origin.vm != HOST_VM {
            // A guest agent's bootstrap: only on a VM with a registration,
            // and only the bootstrap right (docs/GUEST-AGENT.md).
            if self.core.has_bootstrap(&self.origin.vm) {
                Ok(guest::bootstrap_grant())
            } else {
                Err(ServiceError::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "HELLO without a token: VM {:?} has no guest-agent bootstrap; send the VM's token.",
                        self.origin.vm
                    ),
                ))
            }
        } else {
            self.check(&hello.token, &hello.agent_id)
        };
        match &r {
            Err(e) => self.audit("HELLO", &hello.agent_id, None, e),
            Ok(_) => {
                self.origin
                    .resolve_window(self.core.config.vm_api_timeout)
                    .await;
            }
        }
        r
    }

    async fn refresh(&self, session: &Session, refresh: &Refresh) -> Result<Grant, ServiceError> {
        let r = if guest::is_bootstrap(&session.shared_grant()) {
            Err(ServiceError::new(
                ErrorCode::PermissionDenied,
                "A bootstrap session cannot be refreshed; reconnect with HELLO and the token.",
            ))
        } else {
            self.check(&refresh.token, session.agent_id())
        };
        if let Err(e) = &r {
            self.audit("REFRESH", session.agent_id(), Some(session.id()), e);
        }
        r
    }
}

/// Routes the requests of one listener's sessions.
pub(crate) struct RouterHandler {
    pub(crate) core: Arc<Core>,
    pub(crate) origin: Arc<Origin>,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> ServiceError {
    ServiceError::new(code, msg)
}

impl RouterHandler {
    fn audit(
        &self,
        kind: &str,
        session: Option<&Session>,
        service: &str,
        method: &str,
        e: &ServiceError,
    ) {
        self.core.stats.denial(e.code);
        self.core.audit.record(AuditRecord::now(
            kind,
            session.map(Session::agent_id),
            &self.origin.vm,
            session.map(Session::id),
            service,
            method,
            e.code,
            &e.message,
        ));
    }

    fn ctx(&self, session: &Session) -> CallContext {
        CallContext {
            agent: session.agent_id().to_owned(),
            vm: self.origin.vm.clone(),
            session: session.id(),
            window: self.origin.window().cloned(),
        }
    }

    /// Checks every ref of a CALL against the caller's window.
    fn check_refs(&self, refs: &[ShmRef]) -> Result<(), ServiceError> {
        if refs.is_empty() {
            return Ok(());
        }
        let Some(w) = self.origin.window() else {
            return Err(err(
                ErrorCode::ShmUnavailable,
                format!(
                    "The connection's VM {:?} has no shared-memory window.",
                    self.origin.vm
                ),
            ));
        };
        for r in refs {
            if r.range_in(w.len()).is_none() {
                return Err(err(
                    ErrorCode::ShmOutOfBounds,
                    format!(
                        "Shm ref ({}, {}) lies outside the {}-byte window.",
                        r.offset,
                        r.length,
                        w.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn route(&self, session: &Arc<Session>, call: Call) -> Result<Reply, ServiceError> {
        self.check_refs(&call.shm)?;
        if call.service == ROUTER_SERVICE {
            self.core.stats.call(Target::Router);
            return self.router_method(session, &call);
        }
        if call.service == NODE_SERVICE {
            self.core.stats.call(Target::Node);
            return self.node_method(session, call);
        }
        if let Some(target) = call.service.strip_prefix(AGENT_PREFIX) {
            self.core.stats.call(Target::Agent);
            let peer = self.core.agent(target).ok_or_else(|| {
                err(
                    ErrorCode::AgentUnreachable,
                    format!("Agent {target:?} is not connected to this router."),
                )
            })?;
            let mut out = self.inline_refs(call)?;
            // The receiver learns who calls: the router rewrites the address
            // to the caller's, which is also where an answer-call goes.
            out.service = format!("{AGENT_PREFIX}{}", session.agent_id());
            return self.forward(&peer, out, ErrorCode::AgentUnreachable).await;
        }
        let Some(service) = self.core.service(&call.service) else {
            self.core.stats.call(Target::Unknown);
            return Err(err(
                ErrorCode::NoSuchService,
                format!("No service {:?} is registered.", call.service),
            ));
        };
        match service {
            Service::Local(svc) => {
                self.core.stats.call(Target::Local);
                let reply = svc.call(self.ctx(session), call).await?;
                // A local service answers with refs into the caller's window.
                self.check_refs(&reply.shm).map_err(|e| {
                    err(
                        ErrorCode::Internal,
                        format!("The service's reply is invalid: {}", e.message),
                    )
                })?;
                Ok(reply)
            }
            Service::Remote(peer) => {
                self.core.stats.call(Target::Remote);
                let out = self.inline_refs(call)?;
                self.forward(&peer, out, ErrorCode::NoSuchService).await
            }
        }
    }

    /// Resolves a CALL's refs for a target outside the router's process: the
    /// bytes are appended to the inline payload, in order, and the refs dropped.
    fn inline_refs(&self, mut call: Call) -> Result<Call, ServiceError> {
        if call.shm.is_empty() {
            return Ok(call);
        }
        let Some(w) = self.origin.window() else {
            return Err(err(ErrorCode::ShmUnavailable, "The caller has no window."));
        };
        let total = call.payload.len() as u64 + call.shm.iter().map(|r| r.length).sum::<u64>();
        if total > (MAX_PAYLOAD - 1024) as u64 {
            return Err(err(
                ErrorCode::BadRequest,
                format!(
                    "{total} bytes of arguments do not fit one frame to a peer outside the router; \
                     at most {} can be passed to an agent or a host service process.",
                    MAX_PAYLOAD - 1024
                ),
            ));
        }
        let mut bytes = Vec::with_capacity(total as usize);
        bytes.extend_from_slice(&call.payload);
        gather(w, &call.shm, &mut bytes)
            .map_err(|e| err(ErrorCode::ShmOutOfBounds, format!("{e}.")))?;
        call.payload = Bytes::from(bytes);
        call.shm.clear();
        Ok(call)
    }

    async fn forward(
        &self,
        peer: &Peer,
        call: Call,
        gone: ErrorCode,
    ) -> Result<Reply, ServiceError> {
        let reply = match peer
            .session
            .call(&call, self.core.config.forward_timeout)
            .await
        {
            Ok(r) => r,
            Err(SessionCallError::Remote(e)) => return Err(e),
            Err(SessionCallError::Timeout) => {
                return Err(err(ErrorCode::Timeout, "The peer did not answer in time."));
            }
            Err(SessionCallError::Closed) => {
                return Err(err(
                    gone,
                    "The peer's connection closed before it answered.",
                ));
            }
            Err(SessionCallError::Oversize) => {
                return Err(err(
                    ErrorCode::BadRequest,
                    "The call exceeds the frame limit.",
                ));
            }
            Err(SessionCallError::Malformed) => {
                return Err(err(ErrorCode::Internal, "The peer's answer is malformed."));
            }
        };
        if reply.shm.is_empty() {
            return Ok(reply);
        }
        // The peer's refs name its own window: resolve them inline.
        let Some(w) = peer.origin.window() else {
            return Err(err(
                ErrorCode::ShmUnavailable,
                "The peer answered with shm refs but has no window.",
            ));
        };
        for r in &reply.shm {
            if r.range_in(w.len()).is_none() {
                return Err(err(
                    ErrorCode::ShmOutOfBounds,
                    format!(
                        "The peer's shm ref ({}, {}) lies outside its window.",
                        r.offset, r.length
                    ),
                ));
            }
        }
        let mut bytes = reply.payload.to_vec();
        gather(w, &reply.shm, &mut bytes)
            .map_err(|e| err(ErrorCode::ShmOutOfBounds, format!("{e}.")))?;
        Ok(Reply {
            payload: bytes.into(),
            shm: Vec::new(),
        })
    }

    /// `cell0.node/bootstrap` and `cell0.node/ready` from a VM's guest agent.
    /// The answer to `bootstrap` is always the registration of the VM whose
    /// listener the connection came to.
    fn node_method(&self, session: &Arc<Session>, call: Call) -> Result<Reply, ServiceError> {
        use prost::Message;
        let vm = &self.origin.vm;
        match call.method.as_str() {
            cell0_agent::api::M_BOOTSTRAP => {
                let Some(b) = self.core.bootstrap(vm) else {
                    let e = err(
                        ErrorCode::PermissionDenied,
                        format!("The connection's VM {vm:?} has no guest-agent bootstrap."),
                    );
                    self.audit("CALL", Some(session), NODE_SERVICE, &call.method, &e);
                    return Err(e);
                };
                let b = b?;
                tracing::info!(vm = %vm, agent = %b.agent_id, "guest agent bootstrapped");
                Ok(Reply {
                    payload: guest::bootstrap_reply(&b).encode_to_vec().into(),
                    shm: Vec::new(),
                })
            }
            cell0_agent::api::M_READY => {
                if *vm == HOST_VM || guest::is_bootstrap(&session.shared_grant()) {
                    return Err(err(
                        ErrorCode::BadRequest,
                        "Only a VM's guest agent, with its token, reports ready.",
                    ));
                }
                let r = guest::Ready::decode(call.payload)
                    .map_err(|e| err(ErrorCode::BadRequest, format!("Bad ready payload: {e}.")))?;
                tracing::info!(vm = %vm, agent = %r.agent_id, ready_ns = r.ready_ns, kernel = %r.kernel, "guest agent ready");
                self.core.with_agent_status(vm, session.agent_id(), |s| {
                    s.ready = Some(r);
                    s.ready_at = Some(std::time::Instant::now());
                });
                Ok(Reply::default())
            }
            m => Err(err(
                ErrorCode::NoSuchMethod,
                format!("{NODE_SERVICE} has no method {m:?}."),
            )),
        }
    }

    /// The router's own methods: `register/<name>`, `unregister/<name>`, `whoami`.
    fn router_method(&self, session: &Arc<Session>, call: &Call) -> Result<Reply, ServiceError> {
        let m = call.method.as_str();
        if let Some(name) = m.strip_prefix("register/") {
            if !valid_name(name, false)
                || name == ROUTER_SERVICE
                || name == NODE_SERVICE
                || name.starts_with(AGENT_PREFIX)
                || name.starts_with(EVENT_PREFIX)
            {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!("{name:?} cannot be a service name."),
                ));
            }
            let peer = Peer {
                session: session.clone(),
                origin: self.origin.clone(),
            };
            self.core.register_remote(name, peer)?;
            return Ok(Reply::default());
        }
        if let Some(name) = m.strip_prefix("unregister/") {
            self.core.unregister_remote(name, session.id())?;
            return Ok(Reply::default());
        }
        if m == "whoami" {
            let g = session.grant();
            let v = serde_json::json!({
                "agent": session.agent_id(),
                "vm": self.origin.vm,
                "session": session.id(),
                "rights": g.rights.iter().map(|r| [r.service.as_str(), r.method.as_str()]).collect::<Vec<_>>(),
                "expires": g.token_expiry,
                "shm": self.origin.window().map(|w| w.len()),
            });
            return Ok(Reply {
                payload: v.to_string().into(),
                shm: Vec::new(),
            });
        }
        Err(err(
            ErrorCode::NoSuchMethod,
            format!("The router has no method {m:?}."),
        ))
    }

    fn topic_right(
        &self,
        session: &Session,
        kind: &str,
        topic: &str,
        method: &str,
    ) -> Result<String, ServiceError> {
        if !valid_name(topic, false) {
            return Err(err(
                ErrorCode::BadRequest,
                format!("{topic:?} is not a topic name."),
            ));
        }
        let service = format!("{EVENT_PREFIX}{topic}");
        let grant = session.shared_grant();
        // The server checks expiry for CALLs only; EVENTs and SUBSCRIBEs of
        // an expired session are refused here the same way.
        if grant.expired_at(crate::token::keys::unix_now()) {
            let e = err(
                ErrorCode::TokenExpired,
                "The session's token has expired; send REFRESH.",
            );
            self.audit(kind, Some(session), &service, method, &e);
            return Err(e);
        }
        if !permits(&grant.rights, &service, method) {
            let e = err(
                ErrorCode::PermissionDenied,
                format!("The session may not {method} topic {topic:?}."),
            );
            self.audit(kind, Some(session), &service, method, &e);
            return Err(e);
        }
        Ok(service)
    }
}

impl Handler for RouterHandler {
    async fn call(&self, session: Arc<Session>, call: Call) -> Result<Reply, ServiceError> {
        // Only calls with refs can be refused for shm reasons: keep their
        // names for the audit log, and spare the small calls the copies.
        let names = (!call.shm.is_empty()).then(|| (call.service.clone(), call.method.clone()));
        let r = self.route(&session, call).await;
        if let (Err(e), Some((service, method))) = (&r, names) {
            if matches!(
                e.error_code(),
                Some(ErrorCode::ShmOutOfBounds | ErrorCode::ShmUnavailable)
            ) {
                self.audit("CALL", Some(&session), &service, &method, e);
            }
        }
        r
    }

    async fn publish(&self, session: Arc<Session>, mut event: Event) -> Result<(), ServiceError> {
        self.topic_right(&session, "EVENT", &event.topic, "publish")?;
        event.source = session.agent_id().to_owned();
        if self.origin.vm != HOST_VM && guest::is_heartbeat(&event.topic, session.agent_id()) {
            self.core
                .with_agent_status(&self.origin.vm, session.agent_id(), |s| {
                    s.heartbeats += 1;
                    s.last_heartbeat = Some(std::time::Instant::now());
                });
        }
        if let Some(log) = &self.origin.agent_log {
            if guest::is_output(&event.topic, session.agent_id()) {
                if let Err(e) = guest::append_output(log, &event.payload) {
                    tracing::warn!(vm = %self.origin.vm, error = %e, "cannot append to the agent log");
                }
            }
        }
        let d = self.core.topics.publish(&event);
        tracing::trace!(topic = %event.topic, delivered = d.delivered, dropped = d.dropped, "published");
        Ok(())
    }

    async fn subscribe(&self, session: Arc<Session>, topic: String) -> Result<(), ServiceError> {
        self.topic_right(&session, "SUBSCRIBE", &topic, "subscribe")?;
        self.core.topics.subscribe(&topic, &session);
        Ok(())
    }

    async fn unsubscribe(&self, session: Arc<Session>, topic: String) -> Result<(), ServiceError> {
        self.core.topics.unsubscribe(&topic, session.id());
        Ok(())
    }

    fn session_opened(&self, session: &Arc<Session>) {
        // A bootstrap session is nobody's `agent/<id>`: it only fetches the token.
        if guest::is_bootstrap(&session.shared_grant()) {
            return;
        }
        self.core.add_agent(Peer {
            session: session.clone(),
            origin: self.origin.clone(),
        });
    }

    fn session_closed(&self, session: &Arc<Session>) {
        self.core.remove_session(session);
    }

    fn refused(&self, session: Option<&Arc<Session>>, body: &Body, error: &ServiceError) {
        let (kind, service, method) = match body {
            Body::Call(c) => ("CALL", c.service.clone(), c.method.clone()),
            Body::Event(e) => (
                "EVENT",
                format!("{EVENT_PREFIX}{}", e.topic),
                "publish".into(),
            ),
            Body::Subscribe(s) => (
                "SUBSCRIBE",
                format!("{EVENT_PREFIX}{}", s.topic),
                "subscribe".into(),
            ),
            Body::Unsubscribe(s) => (
                "UNSUBSCRIBE",
                format!("{EVENT_PREFIX}{}", s.topic),
                "unsubscribe".into(),
            ),
            Body::Hello(_) => ("HELLO", String::new(), String::new()),
            Body::Refresh(_) => ("REFRESH", String::new(), String::new()),
            other => (other.kind().name(), String::new(), String::new()),
        };
        self.audit(kind, session.map(|s| &**s), &service, &method, error);
    }
}
