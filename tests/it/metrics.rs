//! Every role's `/metrics` is valid Prometheus text exposition, as a strict scraper reads it:
//! checked with `promtool check metrics` (Debian's prometheus package, installed by
//! `scripts/services promtool`) on what each role serves after real traffic.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{free_port, root, wait_for_every, TestEnv, VitalsProc};

fn promtool() -> String {
    let out = Command::new(root().join("scripts/services")).arg("promtool").output().expect("scripts/services promtool");
    assert!(out.status.success(), "installing promtool: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim().to_owned()
}

/// `promtool check metrics` on `text`: (passed, what it said).
fn check(promtool: &str, text: &str) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Whether `expr` parses as PromQL: `promtool check rules` on a one-rule file of it.
fn check_query(promtool: &str, expr: &str) -> (bool, String) {
    let file = std::env::temp_dir().join(format!("vitals-query-{}.yml", uuid::Uuid::new_v4().simple()));
    let rule = serde_json::json!({"groups": [{"name": "q", "rules": [{"record": "vitals:dashboard_query", "expr": expr}]}]});
    std::fs::write(&file, rule.to_string()).unwrap();
    let out = Command::new(promtool).args(["check", "rules"]).arg(&file).output().unwrap();
    let _ = std::fs::remove_file(&file);
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

async fn scrape(http: &reqwest::Client, url: &str, expect: &str) -> String {
    wait_for_every(&format!("{url} to serve {expect}"), Duration::from_secs(120), Duration::from_millis(300), || async move {
        let text = http.get(url).send().await.ok()?.text().await.ok()?;
        text.contains(expect).then_some(text)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_roles_metrics_pass_promtool() {
    let promtool = promtool();
    // The checker itself refuses what this test is about: a family's HELP/TYPE twice.
    let (ok, said) =
        check(&promtool, "# HELP a_total x\n# TYPE a_total counter\na_total 1\n# HELP a_total x\n# TYPE a_total counter\na_total 2\n");
    assert!(!ok, "promtool accepted a repeated family: {said}");

    let env = TestEnv::start().await;
    let data = std::env::temp_dir().join(format!("vitals-metrics-{}", uuid::Uuid::new_v4().simple()));
    let (process_port, sink_port, archive_port) = (free_port(), free_port(), free_port());
    let with = |extra: (&str, String)| {
        let mut v = env.child_env(&data.join(extra.0.to_lowercase()));
        v.push((extra.0.into(), extra.1));
        v
    };
    let mut process_env = with(("VITALS_PROCESSORS__METRICS_LISTEN", format!("127.0.0.1:{process_port}")));
    // Snapshots often enough that the snapshot age is seen back at 0 once the traffic stops.
    process_env.push(("VITALS_PROCESSORS__SNAPSHOT_EVERY_MS".into(), "500".into()));
    let mut process = VitalsProc::new(&["process", "--all"], process_env);
    let mut sink = VitalsProc::new(&["sink"], with(("VITALS_SINK__METRICS_LISTEN", format!("127.0.0.1:{sink_port}"))));
    let mut archive = VitalsProc::new(&["archive"], with(("VITALS_ARCHIVE__METRICS_LISTEN", format!("127.0.0.1:{archive_port}"))));
    process.start();
    sink.start();
    archive.start();
    let report = vitals::simulate::run(&env.sim("metrics", 5, 2, 2), &env.http).await.unwrap();
    assert_eq!(report.rejected, 0);

    // The read API with its realtime gateway (both families on one /metrics).
    let api = {
        let pool = sqlx::PgPool::connect(&env.db_url).await.unwrap();
        let api = vitals::app::api(&env.cfg, pool, true).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { vitals::app::serve(listener, vitals_api::router(api), std::future::pending()).await });
        base
    };
    let unauthenticated = env.http.get(format!("{api}/v1/freshness")).send().await.unwrap();
    assert_eq!(unauthenticated.status().as_u16(), 401);
    let roles = [
        // The read API and its realtime gateway: responses by class (the 401 above included).
        ("api", format!("{api}/metrics"), "vitals_api_responses_total{route=\"/v1/freshness\",class=\"4xx\"} 1"),
        // The schema registry (this test's, in-process): the registrations of the start-up.
        (
            "registry",
            format!("{}/metrics", env.cfg.registry.url),
            "vitals_registry_request_seconds_count{route=\"/subjects/{subject}/versions\"}",
        ),
        ("ingest", format!("{}/metrics", env.ingest_url), "vitals_ingest"),
        // `process --all`: every processor's families once, each with a series per processor.
        ("process --all", format!("http://127.0.0.1:{process_port}/metrics"), "processor=\"product_impact\""),
        ("sink", format!("http://127.0.0.1:{sink_port}/metrics"), "vitals_sink"),
        ("archive", format!("http://127.0.0.1:{archive_port}/metrics"), "vitals_archive"),
    ];
    for (role, url, expect) in &roles {
        let text = scrape(&env.http, url, expect).await;
        let (ok, said) = check(&promtool, &text);
        assert!(ok, "{role}: promtool check metrics failed:\n{said}\n--- exposition ---\n{text}");
    }

    // Traffic over, everything read to its end: no processor or projection is behind, and each
    // task's newest snapshot is of its checkpoint. (Growing ages while records wait or snapshots
    // fail: faults.rs and outages.rs.)
    let process_url = format!("http://127.0.0.1:{process_port}/metrics");
    let sink_url = format!("http://127.0.0.1:{sink_port}/metrics");
    wait_for_every(
        "every freshness and snapshot age at 0 once the traffic is over",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let (http, process_url, sink_url) = (&env.http, &process_url, &sink_url);
            async move {
                let mut text = http.get(process_url).send().await.ok()?.text().await.ok()?;
                text.push_str(&http.get(sink_url).send().await.ok()?.text().await.ok()?);
                let ages: Vec<&str> = text
                    .lines()
                    .filter(|l| {
                        [
                            "vitals_processor_freshness_age_seconds{",
                            "vitals_processor_snapshot_age_seconds{",
                            "vitals_sink_freshness_age_seconds{",
                        ]
                        .iter()
                        .any(|m| l.starts_with(m))
                    })
                    .collect();
                let lags = text.lines().filter(|l| l.starts_with("vitals_sink_lag_records{")).count();
                let processors = vitals_runtime::registry().len();
                let snapshot_ages = ages.iter().filter(|l| l.starts_with("vitals_processor_snapshot_age_seconds{")).count();
                let behind: Vec<&&str> = ages.iter().filter(|l| !l.ends_with(" 0.000")).collect();
                if !behind.is_empty() || lags == 0 || snapshot_ages != processors {
                    eprintln!(
                        "not yet: behind {behind:?}, {lags} sink lag series, {snapshot_ages} snapshot ages of {processors} processors"
                    );
                    return None;
                }
                Some(())
            }
        },
    )
    .await;

    // The alert rules and the dashboard (k8s/monitoring) are valid, and every metric they name is
    // served by a role, so a renamed metric fails here instead of silencing an alert or a panel.
    let rules = root().join("k8s/monitoring/alerts.rules.yml");
    let out = Command::new(&promtool).args(["check", "rules"]).arg(&rules).output().unwrap();
    assert!(out.status.success(), "promtool check rules: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&rules).unwrap();
    let names_in = |exprs: &mut dyn Iterator<Item = &str>| -> Vec<String> {
        let mut named: Vec<String> = exprs
            .flat_map(|l| {
                l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("vitals_"))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        named.sort();
        named.dedup();
        named
    };
    let in_rules =
        names_in(&mut text.lines().filter(|l| !l.trim_start().starts_with('#') && !l.contains("summary:") && !l.contains("description:")));
    assert!(in_rules.len() >= 10, "the rules name too few metrics: {in_rules:?}");
    for m in ["vitals_processor_freshness_age_seconds", "vitals_sink_freshness_age_seconds", "vitals_processor_snapshot_age_seconds"] {
        assert!(in_rules.iter().any(|n| n == m), "no alert on {m}: {in_rules:?}");
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("k8s/monitoring/grafana-dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("the dashboard has panels");
    let exprs: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("every target has an expr").to_owned())
        .collect();
    assert!(panels.len() >= 8 && exprs.len() >= panels.len(), "{} panels, {} queries", panels.len(), exprs.len());
    for e in &exprs {
        let (ok, said) = check_query(&promtool, e);
        assert!(ok, "the dashboard query `{e}` does not parse: {said}");
    }
    let in_dashboard = names_in(&mut exprs.iter().map(String::as_str));
    let mut named = in_rules.clone();
    named.extend(in_dashboard);
    named.sort();
    named.dedup();
    let urls: Vec<String> = roles.iter().map(|(_, url, _)| url.clone()).collect();
    wait_for_every("every metric the alert rules name to be served", Duration::from_secs(120), Duration::from_millis(500), || {
        let (http, urls, named) = (&env.http, &urls, &named);
        async move {
            let mut all = String::new();
            for u in urls {
                all.push_str(&http.get(u).send().await.ok()?.text().await.ok()?);
            }
            // A sample, or the family declared (a labelled counter has no series before its first
            // event, e.g. the first dead letter).
            let served = |m: &str| {
                all.lines()
                    .any(|l| l.starts_with(&format!("{m}{{")) || l.starts_with(&format!("{m} ")) || l.starts_with(&format!("# TYPE {m} ")))
            };
            let missing: Vec<&String> = named.iter().filter(|m| !served(m)).collect();
            if !missing.is_empty() {
                eprintln!("not served yet: {missing:?}");
            }
            missing.is_empty().then_some(())
        }
    })
    .await;
    process.terminate(Duration::from_secs(20));
    sink.terminate(Duration::from_secs(20));
    archive.terminate(Duration::from_secs(20));
    env.cleanup().await;
}
