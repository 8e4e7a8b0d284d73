// SPDX-License-Identifier: Apache-2.0
//! EVENT topics: who subscribes to what, and delivery that never waits.
//!
//! Delivery queues each EVENT on the subscriber's session without blocking
//! ([`Session::push_event`]). A subscriber whose queue is full is dropped:
//! its session gets ERROR `SLOW_CONSUMER` and closes, and it is removed from
//! every topic. The publisher and the other subscribers are not slowed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use cell0_proto::host::Session;
use cell0_proto::host::server::PushError;
use cell0_proto::msg::Event;

/// Topic → subscribers.
#[derive(Debug, Default)]
pub struct Topics {
    map: RwLock<HashMap<String, HashMap<u64, Arc<Session>>>>,
    dropped: AtomicU64,
}

/// What one publish did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Subscribers the EVENT was queued for.
    pub delivered: usize,
    /// Subscribers dropped as too slow.
    pub dropped: usize,
}

impl Topics {
    /// Adds `session` to `topic` (again: no effect).
    pub fn subscribe(&self, topic: &str, session: &Arc<Session>) {
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        m.entry(topic.to_owned())
            .or_default()
            .insert(session.id(), session.clone());
    }

    /// Removes `session` from `topic`.
    pub fn unsubscribe(&self, topic: &str, session: u64) {
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        if let Some(subs) = m.get_mut(topic) {
            subs.remove(&session);
            if subs.is_empty() {
                m.remove(topic);
            }
        }
    }

    /// Removes `session` from every topic.
    pub fn remove_session(&self, session: u64) {
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, subs| {
            subs.remove(&session);
            !subs.is_empty()
        });
    }

    /// Removes every session whose connection has ended.
    pub fn remove_closed(&self) {
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, subs| {
            subs.retain(|_, s| !s.is_closed());
            !subs.is_empty()
        });
    }

    /// Queues `event` for every subscriber of its topic, dropping the slow ones.
    pub fn publish(&self, event: &Event) -> Delivery {
        let mut out = Delivery::default();
        let mut gone = Vec::new();
        {
            let m = self.map.read().unwrap_or_else(|p| p.into_inner());
            let Some(subs) = m.get(&event.topic) else {
                return out;
            };
            for (id, s) in subs {
                match s.push_event(event) {
                    Ok(()) => out.delivered += 1,
                    Err(PushError::SlowConsumer) => {
                        tracing::warn!(session = id, agent = s.agent_id(), topic = %event.topic,
                            "dropping a slow subscriber");
                        out.dropped += 1;
                        gone.push(*id);
                    }
                    Err(PushError::Closed) => gone.push(*id),
                }
            }
        }
        self.dropped
            .fetch_add(out.dropped as u64, Ordering::Relaxed);
        for id in gone {
            self.remove_session(id);
        }
        out
    }

    /// Subscribers dropped as too slow, in total.
    pub fn slow_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Subscribers of `topic` now.
    pub fn subscribers(&self, topic: &str) -> usize {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        m.get(topic).map_or(0, HashMap::len)
    }
}
