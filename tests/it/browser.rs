//! The dashboard in a real browser: Debian's Chromium, headless, driven over the DevTools
//! protocol. The page signs in with a dev token, shows the user's rollups, sleep and sessions as
//! charts, and updates live over the WebSocket when a new upload lands — asserted on the DOM, with
//! a screenshot saved next to the test's output.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use vitals::simulate;

use crate::harness::{root, wait_for, wait_for_every, TestEnv, VitalsProc};

/// A headless Chromium with one page, spoken to over the DevTools protocol.
struct Browser {
    child: Child,
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
    profile: std::path::PathBuf,
}

impl Browser {
    async fn open(url: &str) -> Browser {
        let out = Command::new(root().join("scripts/services")).arg("browser").output().expect("scripts/services browser");
        assert!(out.status.success(), "installing Chromium: {}", String::from_utf8_lossy(&out.stderr));
        let profile = std::env::temp_dir().join(format!("vitals-chromium-{}", uuid::Uuid::new_v4().simple()));
        let child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1280,1600",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromium");
        // Chromium writes its DevTools port into the profile once it listens.
        let port_file = profile.join("DevToolsActivePort");
        let port: u16 = wait_for("Chromium's DevTools port", Duration::from_secs(60), || {
            let f = port_file.clone();
            async move { std::fs::read_to_string(f).ok().and_then(|s| s.lines().next().and_then(|l| l.parse().ok())) }
        })
        .await;
        let http = reqwest::Client::new();
        let page_ws: String = wait_for("the page target", Duration::from_secs(30), || {
            let http = http.clone();
            async move {
                let list: Vec<Value> = http.get(format!("http://127.0.0.1:{port}/json/list")).send().await.ok()?.json().await.ok()?;
                list.into_iter().find(|t| t["type"] == "page").and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
            }
        })
        .await;
        let (ws, _) = tokio_tungstenite::connect_async(page_ws).await.expect("DevTools websocket");
        Browser { child, ws, next_id: 1, profile }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.ws.send(Message::Text(json!({"id": id, "method": method, "params": params}).to_string().into())).await.unwrap();
        loop {
            let msg =
                tokio::time::timeout(Duration::from_secs(30), self.ws.next()).await.expect("DevTools reply within 30 s").unwrap().unwrap();
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["id"] == id {
                    assert!(v.get("error").is_none(), "{method}: {v}");
                    return v["result"].clone();
                }
            }
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    async fn eval(&mut self, expr: &str) -> Value {
        self.call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true})).await["result"]["value"].clone()
    }

    async fn screenshot(&mut self, path: &std::path::Path) -> usize {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"})).await;
        let png = base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap();
        std::fs::write(path, &png).unwrap();
        png.len()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_data_and_updates_live_in_chromium() {
    let env = TestEnv::start().await;
    let data = std::env::temp_dir().join(format!("vitals-browser-{}", uuid::Uuid::new_v4().simple()));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut api_env = env.child_env(&data);
    api_env.push(("VITALS_API__LISTEN".into(), format!("127.0.0.1:{port}")));
    let mut procs = [
        VitalsProc::new(&["api"], api_env),
        VitalsProc::new(&["process", "--all"], env.child_env(&data)),
        VitalsProc::new(&["sink"], env.child_env(&data)),
    ];
    procs.iter_mut().for_each(VitalsProc::start);
    let sim = env.sim("browser", 7, 1, 5);
    let user = simulate::user_id(&sim, 0);
    assert_eq!(simulate::run(&sim, &env.http).await.unwrap().rejected, 0);
    let token = env.token(&user);
    let http = reqwest::Client::new();
    wait_for_every("the user's rollups and nights to be fresh", Duration::from_secs(120), Duration::from_millis(300), || {
        let (http, token) = (&http, &token);
        async move {
            let v: Value =
                http.get(format!("http://127.0.0.1:{port}/v1/freshness")).bearer_auth(token).send().await.ok()?.json().await.ok()?;
            (v["freshness"]["rollup_day"]["state"] == "fresh" && v["freshness"]["sleep_night"]["state"] == "fresh").then_some(())
        }
    })
    .await;

    let mut b = Browser::open(&format!("http://127.0.0.1:{port}/#token={token}")).await;
    // Signed in, charts drawn from the API, realtime connected.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let shown = loop {
        let v = b
            .eval(r#"JSON.stringify({user: document.querySelector('#user').textContent, steps: document.querySelectorAll('[data-metric="steps"] rect.bar').length,
                hr: document.querySelectorAll('[data-metric="heart_rate"] rect.bar').length, sleep: document.querySelectorAll('#sleep rect.bar').length,
                fresh: document.querySelector('#freshness [data-projection="rollup_day"]')?.dataset.state, live: document.querySelector('#live').textContent})"#)
            .await;
        // Null until the page has loaded its script.
        let v: Value = v.as_str().map(|s| serde_json::from_str(s).unwrap()).unwrap_or(Value::Null);
        if v["steps"].as_u64() >= Some(3) && v["hr"].as_u64() >= Some(3) && v["sleep"].as_u64() >= Some(1) && v["live"] == "realtime: live"
        {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "the dashboard did not show the user's data within 60 s: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(shown["user"], user.as_str(), "{shown}");
    assert_eq!(shown["fresh"], "fresh", "{shown}");
    let before: u64 = b.eval("Number(document.querySelector('#live-count').textContent)").await.as_u64().unwrap();

    // A new upload lands: the page updates by itself (no reload), over the WebSocket.
    let now = chrono::Utc::now();
    // The simulated user set a source priority (phone, then watch…) that does not list the
    // manual entry below, so wherever the simulation has steps in the same ten minutes they would
    // win those sub-intervals and today's total could stay under 54321 (seen: 28780.9, pro rata).
    // The user now puts manual entries first, as an app's settings screen would.
    let priority = json!({"request_id": "browser-priority", "changes": [{"change_id": "browser-priority", "kind": "source_priority_updated",
        "occurred_at": now.to_rfc3339(), "source_priority": ["manual-entry"]}]});
    let (s, _, out) = env.post("/v1/domain-changes:batch", &user, &priority).await;
    assert_eq!(s, 200, "{out}");
    let today = (now - chrono::Duration::minutes(20)).format("%Y-%m-%d").to_string(); // the local (UTC) date of the sample
    let steps = json!({"source": "manual-entry", "source_kind": "manual", "source_record_id": "browser-steps", "metric": "steps",
                       "start": (now - chrono::Duration::minutes(20)).to_rfc3339(), "end": (now - chrono::Duration::minutes(10)).to_rfc3339(),
                       "value": 54321, "unit": "count", "time_zone": "UTC"});
    let (s, _, out) = env.post("/v1/health/samples:batch", &user, &json!({"request_id": "browser-1", "samples": [steps]})).await;
    assert_eq!(s, 200, "{out}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let updated = loop {
        let count = b.eval("Number(document.querySelector('#live-count').textContent)").await.as_u64().unwrap_or(0);
        let value = b
            .eval(&format!(r#"Number(document.querySelector('[data-metric="steps"] rect.bar[data-date="{today}"]')?.dataset.value ?? 0)"#))
            .await
            .as_f64()
            .unwrap_or(0.0);
        if count > before && value >= 54321.0 {
            break (count, value);
        }
        if tokio::time::Instant::now() >= deadline {
            let feed = b.eval("document.querySelector('#feed').textContent").await;
            let fresh = b.eval("document.querySelector('#freshness').textContent").await;
            panic!("the page did not update live within 60 s: {count} updates (before: {before}), today's ({today}) steps {value}; feed: {feed}; freshness: {fresh}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(updated.1 >= 54321.0, "today's steps bar carries the new upload: {updated:?}");
    let feed = b.eval("document.querySelector('#feed').textContent").await;
    assert!(feed.as_str().unwrap().contains("rollup_day.upserted"), "the live feed lists the update: {feed}");
    // Cargo's scratch directory for integration tests: it exists wherever the target dir is.
    let shot = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    assert!(b.screenshot(&shot).await > 10_000, "a real screenshot at {}", shot.display());

    drop(b);
    procs.iter_mut().for_each(VitalsProc::kill9);
    let _ = std::fs::remove_dir_all(&data);
    env.cleanup().await;
}
