//! A small in-memory `Store` with etcd semantics, for exercising the server
//! before the embedded backend exists. Not the thing under test.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use futures::StreamExt;
use krvirt_store::{
    EventKind, KeyValue, LeaseId, Result, Revision, Store, StoreError, WatchEvent, WatchStream,
};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

struct State {
    rev: Revision,
    data: BTreeMap<String, KeyValue>,
    history: Vec<WatchEvent>,
    /// Oldest revision still in history.
    oldest: Revision,
    leases: HashMap<LeaseId, i64>,
    next_lease: LeaseId,
}

pub struct MemStore {
    state: Mutex<State>,
    tx: broadcast::Sender<WatchEvent>,
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStore {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(4096);
        MemStore {
            state: Mutex::new(State {
                rev: 0,
                data: BTreeMap::new(),
                history: Vec::new(),
                oldest: 1,
                leases: HashMap::new(),
                next_lease: 1,
            }),
            tx,
        }
    }

    fn commit(st: &mut State, tx: &broadcast::Sender<WatchEvent>, ev: WatchEvent) {
        st.history.push(ev.clone());
        let _ = tx.send(ev);
    }
}

#[async_trait]
impl Store for MemStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        Ok(self.state.lock().unwrap().data.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let st = self.state.lock().unwrap();
        let items = st
            .data
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok((items, st.rev))
    }

    async fn create(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<KeyValue> {
        let mut st = self.state.lock().unwrap();
        if st.data.contains_key(key) {
            return Err(StoreError::AlreadyExists(key.into()));
        }
        st.rev += 1;
        let kv = KeyValue {
            key: key.into(),
            value,
            create_revision: st.rev,
            mod_revision: st.rev,
            version: 1,
            lease,
        };
        st.data.insert(key.into(), kv.clone());
        let ev = WatchEvent {
            kind: EventKind::Put,
            kv: kv.clone(),
            prev: None,
        };
        Self::commit(&mut st, &self.tx, ev);
        Ok(kv)
    }

    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Revision,
        lease: Option<LeaseId>,
    ) -> Result<KeyValue> {
        let mut st = self.state.lock().unwrap();
        let Some(old) = st.data.get(key).cloned() else {
            return Err(StoreError::NotFound(key.into()));
        };
        if old.mod_revision != expected {
            return Err(StoreError::Conflict {
                key: key.into(),
                expected,
                actual: old.mod_revision,
            });
        }
        st.rev += 1;
        let kv = KeyValue {
            key: key.into(),
            value,
            create_revision: old.create_revision,
            mod_revision: st.rev,
            version: old.version + 1,
            lease,
        };
        st.data.insert(key.into(), kv.clone());
        let ev = WatchEvent {
            kind: EventKind::Put,
            kv: kv.clone(),
            prev: Some(old),
        };
        Self::commit(&mut st, &self.tx, ev);
        Ok(kv)
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<KeyValue> {
        let mut st = self.state.lock().unwrap();
        let Some(old) = st.data.get(key).cloned() else {
            return Err(StoreError::NotFound(key.into()));
        };
        if let Some(e) = expected
            && e != old.mod_revision
        {
            return Err(StoreError::Conflict {
                key: key.into(),
                expected: e,
                actual: old.mod_revision,
            });
        }
        st.rev += 1;
        st.data.remove(key);
        let ev = WatchEvent {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: key.into(),
                value: Vec::new(),
                create_revision: old.create_revision,
                mod_revision: st.rev,
                version: 0,
                lease: None,
            },
            prev: Some(old.clone()),
        };
        Self::commit(&mut st, &self.tx, ev);
        Ok(old)
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        let st = self.state.lock().unwrap();
        if from != 0 && from < st.oldest {
            return Err(StoreError::Compacted {
                requested: from,
                oldest: st.oldest,
            });
        }
        let replay: Vec<WatchEvent> = if from == 0 {
            Vec::new()
        } else {
            st.history
                .iter()
                .filter(|e| e.kv.mod_revision >= from && e.kv.key.starts_with(prefix))
                .cloned()
                .collect()
        };
        let rx = self.tx.subscribe();
        let current = st.rev;
        drop(st);
        let prefix = prefix.to_string();
        let min_live = current.max(from - 1);
        let mut last = min_live;
        let live = BroadcastStream::new(rx).filter_map(move |r| {
            let out = match r {
                Ok(ev) if ev.kv.mod_revision > min_live && ev.kv.key.starts_with(&prefix) => {
                    last = ev.kv.mod_revision;
                    Some(Ok(ev))
                }
                Ok(_) => None,
                Err(BroadcastStreamRecvError::Lagged(_)) => Some(Err(StoreError::WatchLagged {
                    resume_from: last + 1,
                })),
            };
            futures::future::ready(out)
        });
        Ok(Box::pin(
            futures::stream::iter(replay.into_iter().map(Ok)).chain(live),
        ))
    }

    async fn compact(&self, rev: Revision) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        if rev > st.rev {
            return Err(StoreError::InvalidArgument(format!(
                "compact beyond {}",
                st.rev
            )));
        }
        st.history.retain(|e| e.kv.mod_revision >= rev);
        st.oldest = st.oldest.max(rev);
        Ok(())
    }

    async fn revision(&self) -> Result<Revision> {
        Ok(self.state.lock().unwrap().rev)
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseId> {
        let mut st = self.state.lock().unwrap();
        let id = st.next_lease;
        st.next_lease += 1;
        st.leases.insert(id, ttl_secs);
        Ok(id)
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> Result<i64> {
        self.state
            .lock()
            .unwrap()
            .leases
            .get(&lease)
            .copied()
            .ok_or(StoreError::LeaseNotFound(lease))
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        let keys: Vec<String> = {
            let mut st = self.state.lock().unwrap();
            if st.leases.remove(&lease).is_none() {
                return Err(StoreError::LeaseNotFound(lease));
            }
            st.data
                .values()
                .filter(|kv| kv.lease == Some(lease))
                .map(|kv| kv.key.clone())
                .collect()
        };
        for k in keys {
            let _ = self.delete(&k, None).await;
        }
        Ok(())
    }
}
