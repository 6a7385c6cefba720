//! The Redis key layout of one queue. Every key shares the queue's hash tag, so a queue lives on
//! one cluster slot and each script touches one slot; the `v1` prefix lets a future layout live
//! beside this one during a rolling deploy.

use herald_core::{JobId, QueueName, TenantId};

/// The version segment of every herald key.
pub const LAYOUT_VERSION: &str = "v1";

#[derive(Debug, Clone)]
pub struct Keys {
    /// `<namespace>:v1:{<queue>}:`
    pub prefix: String,
    /// The keys every script receives, in the order `common.lua` documents.
    pub script_keys: [String; 9],
    pub workers: String,
    pub registry: String,
}

impl Keys {
    pub fn new(namespace: &str, queue: &QueueName) -> Self {
        let prefix = format!("{namespace}:{LAYOUT_VERSION}:{{{queue}}}:");
        let k = |s: &str| format!("{prefix}{s}");
        Self {
            script_keys: [
                k("ready"),
                k("delayed"),
                k("leases"),
                k("dead"),
                k("done"),
                k("tc"),
                k("paused"),
                k("notify"),
                k("seq"),
            ],
            workers: k("workers"),
            registry: registry_key(namespace),
            prefix,
        }
    }

    pub fn ready(&self) -> &str {
        &self.script_keys[0]
    }
    pub fn delayed(&self) -> &str {
        &self.script_keys[1]
    }
    pub fn leases(&self) -> &str {
        &self.script_keys[2]
    }
    pub fn dead(&self) -> &str {
        &self.script_keys[3]
    }
    pub fn done(&self) -> &str {
        &self.script_keys[4]
    }
    pub fn tenant_counts(&self) -> &str {
        &self.script_keys[5]
    }
    pub fn paused(&self) -> &str {
        &self.script_keys[6]
    }
    pub fn notify(&self) -> &str {
        &self.script_keys[7]
    }
    pub fn job(&self, id: &JobId) -> String {
        format!("{}j:{}", self.prefix, id)
    }
    pub fn tenant_dead(&self, tenant: &TenantId) -> String {
        format!("{}x:{}", self.prefix, tenant)
    }
    pub fn worker(&self, worker_id: &str) -> String {
        format!("{}w:{}", self.prefix, worker_id)
    }
}

/// The set of queue names ever used under a namespace (for listings; not part of any script).
pub fn registry_key(namespace: &str) -> String {
    format!("{namespace}:{LAYOUT_VERSION}:queues")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_key_shares_one_hash_tag() {
        let q: QueueName = "sync".parse().unwrap();
        let keys = Keys::new("herald", &q);
        let tag = |k: &str| {
            let open = k.find('{').unwrap();
            let close = k[open..].find('}').unwrap() + open;
            k[open + 1..close].to_owned()
        };
        for k in keys.script_keys.iter() {
            assert_eq!(tag(k), "sync", "{k}");
            assert!(k.starts_with("herald:v1:{sync}:"));
        }
        assert_eq!(tag(&keys.job(&JobId::generate())), "sync");
        assert_eq!(tag(&keys.workers), "sync");
    }
}
