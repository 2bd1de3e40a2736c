//! JSON logs (`--log-format json`, the same subscriber set-up as
//! `telemetry::init_logging`) write 64-bit ids as strings: as JSON numbers,
//! `jq` and JavaScript would round 13081611445655045724 to
//! 13081611445655046000.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use test_support::TestRegistry;

/// A log sink the test reads back.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn json_logs_write_session_ids_as_strings() {
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || writer.clone())
        .finish();
    // This test's thread only; #[tokio::test] runs the server on it too.
    let _guard = tracing::subscriber::set_default(subscriber);

    let registry = TestRegistry::start(registry_server::Settings::default()).await;
    let mut client = registry.client().await;
    let session = client
        .register(test_support::fixtures::register_request("json-1"))
        .await
        .unwrap()
        .into_inner();
    registry.stop().await;

    let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    let line: serde_json::Value = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "node registered")
        .unwrap_or_else(|| panic!("no `node registered` line in {text}"));
    assert_eq!(
        line["session_id"],
        serde_json::Value::String(session.session_id.to_string()),
        "{line}"
    );
}
