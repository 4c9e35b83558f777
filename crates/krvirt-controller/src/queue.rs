//! A work queue with the semantics controllers need (as client-go's):
//! a key queued several times is processed once; a key is never processed by
//! two workers at once (re-adds during processing run again afterwards);
//! keys can be re-queued after a delay.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// An object's identity: namespace (empty for cluster-scoped) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(namespace: &str, name: &str) -> Self {
        Key {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}", self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

#[derive(Default)]
struct State {
    queue: VecDeque<Key>,
    /// Keys waiting to be processed (in `queue`, or re-added while processing).
    dirty: HashSet<Key>,
    processing: HashSet<Key>,
    shut_down: bool,
}

/// Cloneable handle to one queue.
#[derive(Clone, Default)]
pub struct WorkQueue {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

impl WorkQueue {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned queue only means a worker panicked mid-update of plain
        // sets; the data is still consistent enough to continue.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `key` unless it is already waiting.
    pub fn add(&self, key: Key) {
        let mut s = self.lock();
        if s.shut_down || !s.dirty.insert(key.clone()) {
            return;
        }
        if !s.processing.contains(&key) {
            s.queue.push_back(key);
            drop(s);
            self.notify.notify_one();
        }
    }

    /// Queue `key` after `delay`.
    pub fn add_after(&self, key: Key, delay: Duration) {
        if delay.is_zero() {
            self.add(key);
            return;
        }
        let q = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            q.add(key);
        });
    }

    /// Next key to process; `None` once the queue is shut down. Call
    /// [`WorkQueue::done`] when finished with it.
    pub async fn next(&self) -> Option<Key> {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.lock();
                if s.shut_down {
                    return None;
                }
                if let Some(key) = s.queue.pop_front() {
                    s.dirty.remove(&key);
                    s.processing.insert(key.clone());
                    if !s.queue.is_empty() {
                        self.notify.notify_one();
                    }
                    return Some(key);
                }
            }
            notified.await;
        }
    }

    /// Mark `key` processed; if it was re-added meanwhile, queue it again.
    pub fn done(&self, key: &Key) {
        let mut s = self.lock();
        s.processing.remove(key);
        if s.dirty.contains(key) {
            s.queue.push_back(key.clone());
            drop(s);
            self.notify.notify_one();
        }
    }

    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn shut_down(&self) {
        self.lock().shut_down = true;
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn duplicates_collapse() {
        let q = WorkQueue::new();
        q.add(Key::new("a", "x"));
        q.add(Key::new("a", "x"));
        q.add(Key::new("a", "y"));
        assert_eq!(q.len(), 2);
        let k = q.next().await.unwrap();
        assert_eq!(k, Key::new("a", "x"));
        q.done(&k);
        assert_eq!(q.next().await.unwrap(), Key::new("a", "y"));
    }

    #[tokio::test]
    async fn re_add_while_processing_runs_again_after_done() {
        let q = WorkQueue::new();
        q.add(Key::new("", "h"));
        let k = q.next().await.unwrap();
        q.add(k.clone());
        // Not handed to a second worker while the first holds it.
        assert!(q.is_empty());
        q.done(&k);
        assert_eq!(q.next().await.unwrap(), k);
    }

    #[tokio::test]
    async fn add_after_delays() {
        let q = WorkQueue::new();
        q.add_after(Key::new("n", "d"), Duration::from_millis(50));
        assert!(q.is_empty());
        let k = tokio::time::timeout(Duration::from_secs(2), q.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(k, Key::new("n", "d"));
    }

    #[tokio::test]
    async fn shut_down_wakes_waiters() {
        let q = WorkQueue::new();
        let q2 = q.clone();
        let h = tokio::spawn(async move { q2.next().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        q.shut_down();
        assert_eq!(h.await.unwrap(), None);
    }
}
