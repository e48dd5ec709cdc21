//! Replays the fuzzers' kept corpora (`data/fuzz/corpus/<target>`) and every
//! input that once crashed a reader (`data/fuzz/regressions/<target>`) through
//! the same entry points `cargo fuzz` drives (data/fuzz/src/lib.rs), on stable
//! Rust: a reader that panics, overflows its stack or hangs on any of them
//! fails `make test`.

#[path = "../fuzz/src/lib.rs"]
mod entry;

use std::path::Path;
use std::time::{Duration, Instant};

fn cases(folder: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// The last panic's message and place: a decoder's panic that a reader's
/// guard turns into a refusal is counted, not printed; one that reaches the
/// test fails it with this message.
static LAST_PANIC: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

#[test]
fn every_kept_fuzz_input_is_read_or_refused_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut slowest = (Duration::ZERO, String::new());
    for target in entry::TARGETS {
        // A lost corpus would make this test pass vacuously.
        let n = cases(&root.join("corpus").join(target)).len();
        assert!(
            n >= 5,
            "{target}: only {n} kept inputs under data/fuzz/corpus/{target}"
        );
    }
    let guarded = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = guarded.clone();
    std::panic::set_hook(Box::new(move |info| {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = info.to_string();
        }
    }));
    for target in entry::TARGETS {
        let kept = cases(&root.join("corpus").join(target))
            .into_iter()
            .chain(cases(&root.join("regressions").join(target)));
        for case in kept {
            let bytes = std::fs::read(&case).expect("read a kept input");
            let start = Instant::now();
            let outcome = std::panic::catch_unwind(|| entry::read(target, &bytes));
            if outcome.is_err() {
                let _ = std::panic::take_hook();
                let last = LAST_PANIC.lock().map(|m| m.clone()).unwrap_or_default();
                panic!("{target}: {} panicked the reader: {last}", case.display());
            }
            let took = start.elapsed();
            if took > slowest.0 {
                slowest = (took, case.display().to_string());
            }
        }
    }
    let _ = std::panic::take_hook();
    eprintln!(
        "slowest kept input: {:?} ({}); {} decoder panics caught by the readers' guards",
        slowest.0,
        slowest.1,
        guarded.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(slowest.0 < Duration::from_secs(10), "{slowest:?}");
}
