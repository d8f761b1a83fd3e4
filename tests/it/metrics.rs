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
    let mut process =
        VitalsProc::new(&["process", "--all"], with(("VITALS_PROCESSORS__METRICS_LISTEN", format!("127.0.0.1:{process_port}"))));
    let mut sink = VitalsProc::new(&["sink"], with(("VITALS_SINK__METRICS_LISTEN", format!("127.0.0.1:{sink_port}"))));
    let mut archive = VitalsProc::new(&["archive"], with(("VITALS_ARCHIVE__METRICS_LISTEN", format!("127.0.0.1:{archive_port}"))));
    process.start();
    sink.start();
    archive.start();
    let report = vitals::simulate::run(&env.sim("metrics", 5, 2, 2), &env.http).await.unwrap();
    assert_eq!(report.rejected, 0);

    let api = env.serve_api().await;
    let unauthenticated = env.http.get(format!("{api}/v1/freshness")).send().await.unwrap();
    assert_eq!(unauthenticated.status().as_u16(), 401);
    let roles = [
        // The read API and its realtime gateway: responses by class (the 401 above included).
        ("api", format!("{api}/metrics"), "vitals_api_responses_total{class=\"4xx\"} 1"),
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

    // The alert rules (k8s/monitoring) are valid and every metric they name is served by a role,
    // so a renamed metric fails here instead of silencing an alert.
    let rules = root().join("k8s/monitoring/alerts.rules.yml");
    let out = Command::new(&promtool).args(["check", "rules"]).arg(&rules).output().unwrap();
    assert!(out.status.success(), "promtool check rules: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&rules).unwrap();
    let mut named: Vec<String> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.contains("summary:") && !l.contains("description:"))
        .flat_map(|l| {
            l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("vitals_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    named.sort();
    named.dedup();
    assert!(named.len() >= 8, "the rules name too few metrics: {named:?}");
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
                    .any(|l| l.starts_with(&format!("{m}{{")) || l.starts_with(&format!("{m} ")) || l == format!("# TYPE {m} counter"))
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
