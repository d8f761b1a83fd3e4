//! `vitals demo --once`, the README's first command's last step, as a newcomer runs it: no broker
//! configured, so the embedded one; every role in one process; simulated uploads; it must say so,
//! print the dashboard URL with a token, and exit once every projection of every user is fresh.

use std::process::{Command, Stdio};

use crate::harness::{free_port, fresh_db, services_up};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_the_whole_pipeline_on_the_embedded_broker() {
    services_up();
    let (db_url, pool) = fresh_db().await;
    let (registry, ingest, api) = (free_port(), free_port(), free_port());
    let data = std::env::temp_dir().join(format!("vitals-demo-{}", uuid::Uuid::new_v4().simple()));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_vitals"))
            .args(["demo", "--once", "--users", "2", "--days", "2"])
            .env_remove("VITALS_KAFKA__BROKERS")
            .env("VITALS_POSTGRES__URL", &db_url)
            .env("VITALS_REGISTRY__URL", format!("http://127.0.0.1:{registry}"))
            .env("VITALS_REGISTRY__LISTEN", format!("127.0.0.1:{registry}"))
            .env("VITALS_INGEST__LISTEN", format!("127.0.0.1:{ingest}"))
            .env("VITALS_API__LISTEN", format!("127.0.0.1:{api}"))
            .env("VITALS_PROCESSORS__DATA_DIR", &data)
            .stdin(Stdio::null())
            .output()
            .expect("running vitals demo")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "vitals demo --once failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("EMBEDDED in-process broker"), "it says which broker: {stdout}");
    assert!(stdout.contains(&format!("http://127.0.0.1:{api}/#token=")), "it prints the dashboard URL with a token: {stdout}");
    assert!(stdout.contains("every projection is fresh"), "{stdout}");
    for table in ["proj_rollup_day", "proj_sleep_night", "proj_session_impact"] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE NOT deleted")).fetch_one(&pool).await.unwrap();
        assert!(n > 0, "{table} has rows");
    }
}
