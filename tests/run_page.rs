//! The coordinator's live run page, in a real browser: headless Chromium loads
//! `/` from a token-protected coordinator on loopback while two workers train a
//! run; the charts (read through the page's own JavaScript) hold every step of
//! `metrics.jsonl` and every evaluation of `eval.jsonl`; the screenshot is kept.

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use dpo_e2e::*;

const TOKEN: &str = "page-s3cret";

/// `GET path` on the HTTP port; the status code and the body.
fn get(port: u16, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

fn series(v: &serde_json::Value) -> Vec<Option<f64>> {
    v.as_array()
        .expect("a series")
        .iter()
        .map(serde_json::Value::as_f64)
        .collect()
}

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() <= 1e-12 * b.abs().max(1.0))
}

#[test]
fn the_run_page_charts_every_step_of_a_live_run_in_a_real_browser() {
    let case = Case::new(48);
    let dir = case.path();
    let spec = case.write_spec(
        "paged",
        "max_steps = 12\nmicro_batch_size = 2\neval_every = 2\n[cluster]\nmin_workers = 2\nmax_workers = 2",
    );
    let text = std::fs::read_to_string(&spec).expect("spec").replacen(
        "[data]\n",
        &format!(
            "[data]\neval = \"{}\"\n",
            dir.join("data/eval.jsonl").display()
        ),
        1,
    );
    std::fs::write(&spec, text).expect("spec");

    let port = free_port().expect("port");
    let http = free_port().expect("port");
    let listen = format!("127.0.0.1:{http}");
    let _c = coordinator(
        port,
        &dir.join("coord"),
        &case.logs,
        "coordinator",
        &["--metrics-listen", &listen],
        Some(TOKEN),
    )
    .expect("coordinator");
    let worker = |name: &str| {
        Proc::spawn(
            name,
            Command::new(bin("dpo-worker"))
                .args(["--coordinator", &format!("http://127.0.0.1:{port}")])
                .args(["--device", "cpu", "--worker-id", name])
                .env("DPO_TOKEN", TOKEN),
            &case.logs,
        )
        .expect("worker")
    };
    let _w0 = worker("w0");
    let _w1 = worker("w1");

    // The page and its JSON need the token; /metrics stays open for scrapers.
    assert_eq!(get(http, "/", None).0, 401);
    assert!(get(http, "/", None).1.contains("needs a token"));
    assert_eq!(get(http, "/api/runs", None).0, 401);
    assert_eq!(get(http, "/api/runs", Some("wrong")).0, 401);
    assert_eq!(get(http, "/?token=wrong", None).0, 401);
    assert_eq!(get(http, "/metrics", None).0, 200);
    assert_eq!(get(http, "/api/runs", Some(TOKEN)).0, 200);

    let submitted = Command::new(bin("dpoctl"))
        .args(["--coordinator", &format!("http://127.0.0.1:{port}")])
        .args(["submit", "--watch"])
        .arg(&spec)
        .env("DPO_TOKEN", TOKEN)
        .output()
        .expect("dpoctl");
    assert!(
        submitted.status.success(),
        "{}{}",
        String::from_utf8_lossy(&submitted.stderr),
        case.logs()
    );

    let shot = dir.join("run-page.png");
    let out = dir.join("page.json");
    let ready = "window.dpoReady === true && dpo.charts.loss \
                 && dpo.charts.loss.plot.data[0].length === 12 \
                 && dpo.runs.some(r => r.state === 'RUN_STATE_SUCCEEDED') \
                 && document.querySelectorAll('#workers tbody tr').length === 2";
    let value = "{ charts: Object.fromEntries(Object.entries(dpo.charts).map(\
                 ([k, c]) => [k, { labels: c.plot.series.map(s => s.label), data: c.plot.data }])), \
                 runs: dpo.runs.map(r => [r.name, r.state, r.step]), \
                 workers: [...document.querySelectorAll('#workers tbody tr')].map(tr => tr.cells[0].textContent), \
                 history: document.getElementById('history').textContent, \
                 url: location.href }";
    let page_url = format!("http://127.0.0.1:{http}/?token={TOKEN}");
    let run = Command::new(python())
        .arg(root().join("tests/reference/run_page.py"))
        .args([&page_url, ready, value])
        .arg(&shot)
        .arg(&out)
        .arg("90")
        .output()
        .expect("python");
    assert!(
        run.status.success(),
        "{}{}",
        String::from_utf8_lossy(&run.stderr),
        case.logs()
    );
    let page: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("page.json")).expect("json");

    // The token left the address bar.
    let url = page["url"].as_str().expect("url");
    assert!(!url.contains("token"), "{url}");
    assert_eq!(page["runs"][0][0], "paged");
    assert_eq!(page["runs"][0][2], 12);
    let mut workers: Vec<&str> = page["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w.as_str())
        .collect();
    workers.sort_unstable();
    assert_eq!(workers, ["w0", "w1"]);
    assert!(
        page["history"]
            .as_str()
            .is_some_and(|h| h.contains("2 workers · steps 1–12")),
        "{}",
        page["history"]
    );

    // Every step of metrics.jsonl is on the loss chart, every evaluation on it too.
    let train = jsonl(&dir.join("paged/metrics.jsonl"));
    let eval = jsonl(&dir.join("paged/eval.jsonl"));
    assert_eq!(train.len(), 12);
    assert_eq!(eval.len(), 6);
    let loss = &page["charts"]["loss"];
    assert_eq!(loss["labels"], serde_json::json!(["step", "train", "eval"]));
    let steps = series(&loss["data"][0]);
    let train_loss = series(&loss["data"][1]);
    let eval_loss = series(&loss["data"][2]);
    for (i, line) in train.iter().enumerate() {
        assert_eq!(steps[i], line["step"].as_f64());
        assert!(close(train_loss[i], line["loss"].as_f64().expect("loss")));
    }
    for line in &eval {
        let at = line["step"].as_f64().expect("step");
        let i = steps
            .iter()
            .position(|s| *s == Some(at))
            .expect("an eval step is a step");
        assert!(close(
            eval_loss[i],
            line["eval_loss"].as_f64().expect("eval_loss")
        ));
    }
    // The other charts are there, with points.
    for chart in ["accuracy", "margin", "throughput"] {
        let data = &page["charts"][chart]["data"];
        assert_eq!(
            series(&data[0]).len(),
            12,
            "{chart}: {}",
            page["charts"][chart]
        );
    }
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "a real screenshot"
    );
    // Kept beside the test's output for a look (docs/run-page.png is one of these).
    let keep = root().join("target/run-page.png");
    let _ = std::fs::copy(&shot, &keep);
    eprintln!("screenshot: {}", keep.display());
}
