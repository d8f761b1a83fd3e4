//! One upload, one trace: the edge's request, the processor's record, the sink's commit and the
//! realtime delivery are each a span, each the child of the hop before, exported over OTLP/HTTP
//! by every role to a receiver this test runs; no span names a user or a health value in clear.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use futures::StreamExt;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message as _;
use serde_json::json;

use crate::harness::{free_port, metric_sum, wait_for_every, wait_listening, TestEnv, VitalsProc};

#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    attributes: Vec<(String, String)>,
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf): every span it was sent.
async fn receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let store = Arc::clone(&spans);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let store = Arc::clone(&store);
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("the exporter sends OTLP protobuf");
                let mut got = store.lock().unwrap();
                for rs in req.resource_spans {
                    let attrs = |kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]| -> Vec<(String, String)> {
                        kvs.iter()
                            .map(|kv| {
                                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                    Some(Any::StringValue(s)) => s.clone(),
                                    Some(Any::IntValue(i)) => i.to_string(),
                                    Some(Any::DoubleValue(d)) => d.to_string(),
                                    Some(Any::BoolValue(b)) => b.to_string(),
                                    other => format!("{other:?}"),
                                };
                                (kv.key.clone(), v)
                            })
                            .collect()
                    };
                    let resource = rs.resource.map(|r| attrs(&r.attributes)).unwrap_or_default();
                    let service = resource.iter().find(|(k, _)| k == "service.name").map(|(_, v)| v.clone()).unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            got.push(Span {
                                service: service.clone(),
                                name: s.name.clone(),
                                trace: hex::encode(&s.trace_id),
                                id: hex::encode(&s.span_id),
                                parent: hex::encode(&s.parent_span_id),
                                attributes: attrs(&s.attributes),
                            });
                        }
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upload_is_one_trace_with_a_span_for_every_hop() {
    let (otlp, spans) = receiver().await;
    let env = TestEnv::start().await;
    let data = std::env::temp_dir().join(format!("vitals-traces-{}", uuid::Uuid::new_v4().simple()));
    let traced = |extra: &[(&str, String)]| {
        let mut v = env.child_env(&data);
        v.push(("VITALS_TELEMETRY__OTLP_ENDPOINT".into(), otlp.clone()));
        v.push(("VITALS_TELEMETRY__EXPORT_DELAY_MS".into(), "100".into()));
        v.push(("VITALS_TELEMETRY__USER_HASH_KEY".into(), "the-deployment-key".into()));
        v.extend(extra.iter().map(|(k, val)| (k.to_string(), val.clone())));
        v
    };
    let (ingest_port, gateway_port, unsampled_port) = (free_port(), free_port(), free_port());
    let mut ingest = VitalsProc::new(&["ingest"], traced(&[("VITALS_INGEST__LISTEN", format!("127.0.0.1:{ingest_port}"))]));
    let process_metrics = free_port();
    let mut process = VitalsProc::new(
        &["process", "rollup_day"],
        traced(&[("VITALS_PROCESSORS__METRICS_LISTEN", format!("127.0.0.1:{process_metrics}"))]),
    );
    let mut sink = VitalsProc::new(&["sink"], traced(&[]));
    let mut gateway = VitalsProc::new(&["realtime"], traced(&[("VITALS_API__LISTEN", format!("127.0.0.1:{gateway_port}"))]));
    // A second edge that samples no new trace.
    let mut unsampled = VitalsProc::new(
        &["ingest"],
        traced(&[("VITALS_INGEST__LISTEN", format!("127.0.0.1:{unsampled_port}")), ("VITALS_TELEMETRY__SAMPLE_RATIO", "0.0".into())]),
    );
    for p in [&mut ingest, &mut process, &mut sink, &mut gateway, &mut unsampled] {
        p.start();
    }
    wait_listening("the traced edge", &format!("127.0.0.1:{ingest_port}")).await;
    wait_listening("the traced gateway", &format!("127.0.0.1:{gateway_port}")).await;
    wait_listening("the unsampling edge", &format!("127.0.0.1:{unsampled_port}")).await;

    let user = format!("trace-user-{}", uuid::Uuid::new_v4().simple());
    env.consent(&user, &[]).await;
    // The consent is an input of the user's too: read in the same interval as the upload, and
    // after it, its trace would be the newest of the user's (what the rows carry). Its interval
    // is done first.
    wait_for_every("the processor to have read the consent", Duration::from_secs(60), Duration::from_millis(100), || async {
        let body = reqwest::get(format!("http://127.0.0.1:{process_metrics}/metrics")).await.ok()?.text().await.ok()?;
        (metric_sum(&body, "vitals_processor_records_in_total") >= 1.0 && metric_sum(&body, "vitals_processor_checkpoints_total") >= 1.0)
            .then_some(())
    })
    .await;
    let token = env.token(&user);
    let url = format!("ws://127.0.0.1:{gateway_port}/v1/realtime?token={token}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("websocket connect");

    // The phone's own span: the upload continues its trace.
    let (trace_id, phone_span) = ("5c1c63257de34c67a8b6e4f1d2b0a9c3", "a1b2c3d4e5f60718");
    let upload = |port: u16, record: &'static str, minutes: i64, traceparent: String| {
        let now = chrono::Utc::now();
        let body = json!({"request_id": format!("traced-{}", uuid::Uuid::new_v4()), "samples": [{"source": "com.apple.health.watch",
            "source_kind": "watch", "source_record_id": record, "metric": "heart_rate",
            "start": (now - chrono::Duration::minutes(minutes)).to_rfc3339(), "end": (now - chrono::Duration::minutes(minutes - 1)).to_rfc3339(),
            "value": 87.25, "unit": "count/min", "time_zone": "UTC"}]});
        let req = env
            .http
            .post(format!("http://127.0.0.1:{port}/v1/health/samples:batch"))
            .bearer_auth(&token)
            .header("traceparent", traceparent)
            .json(&body);
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 200, "{}", resp.text().await.unwrap());
        }
    };
    upload(ingest_port, "traced-1", 5, format!("00-{trace_id}-{phone_span}-01")).await;

    // The envelope reaches the phone, naming the trace it belongs to.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let envelope: serde_json::Value = loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => break serde_json::from_str(&t).unwrap(),
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("the realtime socket ended: {other:?}"),
            Err(_) => panic!("no realtime envelope within 90 s of the upload"),
        }
    };
    assert!(envelope["traceparent"].as_str().is_some_and(|tp| tp.contains(trace_id)), "{envelope}");

    // Every hop's span, in that one trace, each the child of the one before.
    let hops = [
        ("vitals-ingest", "ingest.batch"),
        ("vitals-process", "process.record"),
        ("vitals-sink", "sink.apply"),
        ("vitals-realtime", "realtime.deliver"),
    ];
    let trace: Vec<Span> =
        wait_for_every("a span of every hop in the upload's trace", Duration::from_secs(60), Duration::from_millis(200), || {
            let got: Vec<Span> = spans.lock().unwrap().iter().filter(|s| s.trace == trace_id).cloned().collect();
            let whole = hops.iter().all(|(service, name)| got.iter().any(|s| s.service == *service && s.name == *name));
            if !whole {
                let seen: Vec<(&str, &str)> = got.iter().map(|s| (s.service.as_str(), s.name.as_str())).collect();
                eprintln!("not yet: {seen:?}");
            }
            async move { whole.then_some(got) }
        })
        .await;
    let of = |name: &str| trace.iter().filter(|s| s.name == name).collect::<Vec<_>>();
    let ingest_spans = of("ingest.batch");
    assert_eq!(ingest_spans.len(), 1, "one edge span: {trace:#?}");
    assert_eq!(ingest_spans[0].parent, phone_span, "the edge continues the phone's span");
    for pair in hops.windows(2) {
        let (parents, children) = (of(pair[0].1), of(pair[1].1));
        for c in &children {
            assert!(parents.iter().any(|p| p.id == c.parent), "{} is not a child of {}: {trace:#?}", c.name, pair[0].1);
        }
    }
    assert!(envelope["traceparent"].as_str().unwrap().contains(&of("sink.apply")[0].id), "the envelope names the sink's span");

    // No span of the trace carries the user id or the health value in clear; the hashed id is there.
    let hashed = vitals_schemas::trace::user_keyed(b"the-deployment-key", &user);
    for s in &trace {
        for (k, v) in &s.attributes {
            assert!(!v.contains(&user), "{}: attribute {k} = {v:?} names the user", s.name);
            assert!(!v.contains("87.25"), "{}: attribute {k} = {v:?} carries the health value", s.name);
        }
        assert!(
            s.attributes.iter().any(|(k, v)| k == "user" && *v == hashed),
            "{} does not name its user hashed: {:?}",
            s.name,
            s.attributes
        );
    }

    // A phone that asks for a trace (`-01`) at an edge sampling none gets none: the edge decides,
    // and every later hop follows it (the envelope's context says unsampled; no span is sent).
    let forced = "7d0e5a4b3c2f1e0d9c8b7a6f5e4d3c2b";
    upload(unsampled_port, "traced-2", 10, format!("00-{forced}-{phone_span}-01")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let second: serde_json::Value = loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                let e: serde_json::Value = serde_json::from_str(&t).unwrap();
                if e["traceparent"].as_str().is_some_and(|tp| tp.contains(forced)) {
                    break e;
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("the realtime socket ended: {other:?}"),
            Err(_) => panic!("no realtime envelope of the second upload within 90 s"),
        }
    };
    assert!(second["traceparent"].as_str().unwrap().ends_with("-00"), "the forced trace is unsampled: {second}");
    let leaked: Vec<Span> = spans.lock().unwrap().iter().filter(|s| s.trace == forced).cloned().collect();
    assert!(leaked.is_empty(), "spans of a trace the edge did not sample: {leaked:#?}");

    for p in [&mut ingest, &mut process, &mut sink, &mut gateway, &mut unsampled] {
        p.terminate(Duration::from_secs(20));
    }
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
