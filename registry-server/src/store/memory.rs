//! The memory backend: nothing survives a restart (today's behaviour, and
//! the tests' default, so `cargo test` stays fast and hermetic).

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use registry_proto::pb;

use super::{Commit, Loaded, NodeRecord, Store, StoreError};

/// A store that keeps nothing: every write is "durable" at once, and a
/// start loads nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryStore;

impl Store for MemoryStore {
    fn load(&self) -> BoxFuture<'static, Result<Loaded, StoreError>> {
        std::future::ready(Ok(Loaded::default())).boxed()
    }

    fn put_node(&self, _record: NodeRecord) -> Commit {
        std::future::ready(Ok(())).boxed()
    }

    fn delete_node(&self, _node_id: &str) -> Commit {
        std::future::ready(Ok(())).boxed()
    }

    fn put_admin(&self, _node_id: &str, _admin: Option<pb::AdminState>) -> Commit {
        std::future::ready(Ok(())).boxed()
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        std::future::ready(()).boxed()
    }

    fn describe(&self) -> String {
        "memory (nothing survives a restart)".to_string()
    }
}
