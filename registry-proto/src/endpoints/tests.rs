use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus as Serving;

use super::*;

fn list(text: &str) -> Result<Vec<String>, RuleError> {
    parse_list("--registry", text)
}

#[test]
fn a_list_is_split_trimmed_and_deduplicated() {
    assert_eq!(list("http://a:1").unwrap(), ["http://a:1"]);
    assert_eq!(
        list(" http://a:1 , http://b:2,http://a:1").unwrap(),
        ["http://a:1", "http://b:2"]
    );
}

#[test]
fn a_bad_entry_is_named_by_its_position() {
    let err = list("http://a:1,ftp://b:2").unwrap_err().to_string();
    assert!(err.contains("--registry[1]"), "{err}");
    assert!(err.contains("ftp://b:2"), "{err}");
    let err = list("http://a:1,,http://b:2").unwrap_err().to_string();
    assert!(
        err.contains("--registry[1]") && err.contains("empty"),
        "{err}"
    );
    let err = list("http://a:1,").unwrap_err().to_string();
    assert!(err.contains("--registry[1]"), "{err}");
    let err = list("").unwrap_err().to_string();
    assert_eq!(err, "invalid --registry: is empty");
    let err = list("http://a:99999").unwrap_err().to_string();
    assert!(err.starts_with("invalid --registry: "), "{err}");
    assert!(err.contains("port"), "{err}");
}

#[test]
fn one_scheme_for_the_whole_list() {
    let err = list("https://a:1,http://b:2").unwrap_err().to_string();
    assert!(err.contains("--registry[1]"), "{err}");
    assert!(err.contains("mixes http:// and https://"), "{err}");
}

#[tokio::test]
async fn addresses_and_unresolvable_names_are_dialled_as_given() {
    let targets = resolve(&["http://127.0.0.1:5".into(), "http://[::1]:6".into()]).await;
    assert_eq!(
        targets,
        [
            Target {
                url: "http://127.0.0.1:5".into(),
                origin: None,
                host: "127.0.0.1".into()
            },
            Target {
                url: "http://[::1]:6".into(),
                origin: None,
                host: "::1".into()
            },
        ]
    );
    // ".invalid" never resolves (RFC 6761): tonic tries at each connect.
    let targets = resolve(&["http://registry.invalid:7".into()]).await;
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].url, "http://registry.invalid:7");
}

#[tokio::test]
async fn a_name_with_several_addresses_is_several_endpoints() {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(("localhost", 50051))
        .await
        .map(|found| found.collect())
        .unwrap_or_default();
    let targets = resolve(&["http://localhost:50051".into()]).await;
    if addrs.len() < 2 {
        // This host's resolver gives localhost one address: kept as given.
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].url, "http://localhost:50051");
        return;
    }
    assert_eq!(targets.len(), addrs.len());
    for (target, addr) in targets.iter().zip(&addrs) {
        assert_eq!(target.url, format!("http://{addr}"));
        assert_eq!(target.origin.as_deref(), Some("http://localhost:50051"));
        assert_eq!(target.host, "localhost");
        assert!(target.label().contains("(http://localhost:50051)"));
    }
}

#[test]
fn localhost_with_two_addresses_is_two_endpoints_named_localhost() {
    let url = "https://localhost:50051";
    let direct = Target::direct(url).unwrap();
    let addrs = vec![
        "127.0.0.1:50051".parse().unwrap(),
        "[::1]:50051".parse().unwrap(),
        "127.0.0.1:50051".parse().unwrap(),
    ];
    let targets = expand(&url.parse().unwrap(), direct.clone(), addrs);
    let urls: Vec<&str> = targets.iter().map(|t| t.url.as_str()).collect();
    assert_eq!(urls, ["https://127.0.0.1:50051", "https://[::1]:50051"]);
    for target in &targets {
        assert_eq!(target.origin.as_deref(), Some(url));
        assert_eq!(target.host, "localhost", "TLS verifies the name");
    }
    let one = expand(
        &url.parse().unwrap(),
        direct.clone(),
        vec!["127.0.0.1:50051".parse().unwrap()],
    );
    assert_eq!(one, [direct]);
}

#[tokio::test]
async fn an_expanded_endpoint_is_dialled_by_address_and_named_by_host() {
    // Served on 127.0.0.1 only: the ::1 endpoint of "localhost" is
    // skipped as unreachable, the 127.0.0.1 one answers, and the request
    // carries the name (origin) the list gave.
    let leader = HealthServer::start(Some(Serving::Serving)).await;
    let port = leader.url.rsplit(':').next().unwrap();
    let url = format!("http://localhost:{port}");
    let uri: http::Uri = url.parse().unwrap();
    let targets = expand(
        &uri,
        Target::direct(&url).unwrap(),
        vec![
            format!("[::1]:{port}").parse().unwrap(),
            format!("127.0.0.1:{port}").parse().unwrap(),
        ],
    );
    let replicas = replicas(&[&url]);
    let probes = futures_util::future::join_all(targets.iter().map(|t| replicas.probe(t))).await;
    assert!(matches!(probes[0], Probe::Unreachable(_)), "{probes:?}");
    assert_eq!(probes[1], Probe::Serving);
}

/// A health service on 127.0.0.1:0 saying `status` for the leader entry
/// (`None`: no such entry), stopped when dropped.
struct HealthServer {
    url: String,
    reporter: tonic_health::server::HealthReporter,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl HealthServer {
    async fn start(status: Option<Serving>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (reporter, service) = tonic_health::server::health_reporter();
        if let Some(status) = status {
            reporter
                .set_service_status(LEADER_HEALTH_SERVICE, status)
                .await;
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                }),
        );
        HealthServer {
            url,
            reporter,
            _stop: stop,
        }
    }
}

/// A port nothing listens on: bound, read back, closed.
async fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

fn replicas(urls: &[&str]) -> Replicas {
    Replicas::new(
        urls.iter().map(|u| (*u).to_owned()).collect(),
        Dialer::default(),
    )
    .unwrap()
    .with_probe_timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn the_serving_replica_is_the_leader() {
    let follower = HealthServer::start(Some(Serving::NotServing)).await;
    let leader = HealthServer::start(Some(Serving::Serving)).await;
    let down = closed_port_url().await;
    let replicas = replicas(&[&down, &follower.url, &leader.url]);
    assert_eq!(replicas.current().label, down, "the first until asked");
    let chosen = replicas.leader().await.unwrap();
    assert_eq!(chosen.label, leader.url);
    // Nothing failed since: no new discovery, the same choice.
    let again = replicas.leader().await.unwrap();
    assert_eq!(again.epoch, chosen.epoch);
}

#[tokio::test]
async fn a_registry_without_the_entry_is_used_when_none_leads() {
    let follower = HealthServer::start(Some(Serving::NotServing)).await;
    let plain = HealthServer::start(None).await;
    let replicas = replicas(&[&follower.url, &plain.url]);
    assert_eq!(replicas.leader().await.unwrap().label, plain.url);
}

#[tokio::test]
async fn a_follower_is_asked_when_none_leads_and_no_answer_is_an_error() {
    let follower = HealthServer::start(Some(Serving::NotServing)).await;
    let down = closed_port_url().await;
    let replicas = replicas(&[&down, &follower.url]);
    // Its refusal names the leader, or says that none is elected.
    let chosen = replicas.leader().await.unwrap();
    assert_eq!(chosen.label, follower.url);

    let other_down = closed_port_url().await;
    let replicas = self::replicas(&[&down, &other_down]);
    let err = replicas.leader().await.unwrap_err();
    assert_eq!(err.count, 2);
    let text = err.to_string();
    assert!(text.contains(&format!("{down}: unreachable")), "{text}");
    assert!(
        text.contains(&format!("{other_down}: unreachable")),
        "{text}"
    );
    assert_eq!(err.status().code(), Code::Unavailable);
}

#[tokio::test]
async fn a_new_leader_is_found_at_the_next_look() {
    let first = HealthServer::start(Some(Serving::Serving)).await;
    let second = HealthServer::start(Some(Serving::NotServing)).await;
    let replicas = replicas(&[&first.url, &second.url]);
    let chosen = replicas.leader().await.unwrap();
    assert_eq!(chosen.label, first.url);
    first
        .reporter
        .set_service_status(LEADER_HEALTH_SERVICE, Serving::NotServing)
        .await;
    second
        .reporter
        .set_service_status(LEADER_HEALTH_SERVICE, Serving::Serving)
        .await;
    // The leader stepped down: its streams end UNAVAILABLE.
    replicas.failed(&chosen, &Status::unavailable("stepped down"));
    assert_eq!(replicas.leader().await.unwrap().label, second.url);
}

#[tokio::test]
async fn a_single_endpoint_is_used_without_asking() {
    let down = closed_port_url().await;
    let replicas = replicas(&[&down]);
    assert_eq!(replicas.leader().await.unwrap().label, down);
}

#[tokio::test]
async fn a_hint_is_followed_first_and_failures_are_acted_on_once() {
    let follower = HealthServer::start(Some(Serving::NotServing)).await;
    let leader = HealthServer::start(Some(Serving::Serving)).await;
    let replicas = replicas(&[&follower.url]);
    let first = replicas.leader().await.unwrap();
    assert_eq!(first.label, follower.url);

    // A live leader's answer changes nothing.
    assert_eq!(
        replicas.failed(&first, &Status::not_found("no such node")),
        None
    );
    assert_eq!(replicas.leader().await.unwrap().epoch, first.epoch);

    let refusal = replica::not_leader(Some(&leader.url));
    assert_eq!(
        replicas.failed(&first, &refusal).as_deref(),
        Some(leader.url.as_str())
    );
    let moved = replicas.leader().await.unwrap();
    assert_eq!(moved.label, leader.url);
    // Another caller's failure on the endpoint left behind is ignored.
    assert_eq!(replicas.failed(&first, &refusal), None);
    assert_eq!(replicas.leader().await.unwrap().epoch, moved.epoch);

    // The leader dies: the next call looks again, from the list.
    assert_eq!(
        replicas.failed(&moved, &Status::unavailable("connection refused")),
        None
    );
    assert_eq!(replicas.leader().await.unwrap().label, follower.url);
}

#[tokio::test]
async fn a_hint_that_does_not_lead_falls_back_to_the_list() {
    let follower = HealthServer::start(Some(Serving::NotServing)).await;
    let leader = HealthServer::start(Some(Serving::Serving)).await;
    let replicas = replicas(&[&follower.url, &leader.url]);
    let first = replicas.leader().await.unwrap();
    assert_eq!(first.label, leader.url);
    // A stale hint naming the follower: asked, refused, the list decides.
    replicas.failed(&first, &replica::not_leader(Some(&follower.url)));
    assert_eq!(replicas.leader().await.unwrap().label, leader.url);
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_hangs_is_bounded() {
    // A listener that accepts nothing: the TCP handshake completes in the
    // kernel's backlog, the HTTP/2 one never does.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let replicas = Replicas::new(vec![url.clone()], Dialer::default())
        .unwrap()
        .with_probe_timeout(Duration::from_millis(300));
    let probe = replicas.probe(&Target::direct(&url).unwrap()).await;
    assert_eq!(
        probe,
        Probe::Unreachable("no health answer within 300ms".into())
    );
}

#[test]
fn an_empty_list_is_refused() {
    assert!(matches!(
        Replicas::new(Vec::new(), Dialer::default()),
        Err(DialError::Empty)
    ));
}
