//! `keywarden key show K --watch`: follows the key's rotation once a second
//! until it finishes. On a terminal one line is redrawn in place; otherwise (a
//! log, a pipe) a line is printed per poll, so the record reads top to bottom.
//! Ctrl-C stops it like any command: it only reads.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use reqwest::Method;
use serde_json::Value;

use super::client::request;
use super::Output;
use crate::text::percent_encode;

const POLL: Duration = Duration::from_secs(1);
/// The rate shown is over the last few seconds: after a pause (key disabled,
/// KMS throttling) the whole-job average would promise too much or too little.
const WINDOW: Duration = Duration::from_secs(10);
const BAR: usize = 30;

pub(super) fn run(client: &Client, base: &str, token: &str, key_id: &str, output: Output) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/keys/{}", percent_encode(key_id));
    let redraw = output == Output::Text && std::io::stdout().is_terminal();
    let mut window = Window::default();
    loop {
        let view = request(client, base, token, Method::GET, &path, None)?;
        let Some(rotation) = view.get("rotation").filter(|r| r.is_object()) else {
            eprintln!("key {key_id} has no rotation to watch");
            return Ok(ExitCode::SUCCESS);
        };
        let p = Progress::from_json(rotation);
        window.push(Instant::now(), p.done + p.failed);
        let rate = window.rate().unwrap_or(p.rate);
        let mut out = std::io::stdout().lock();
        match output {
            Output::Json => writeln!(out, "{}", serde_json::to_string(rotation)?)?,
            Output::Text if redraw => write!(out, "\r{}\x1b[K", line(key_id, &p, rate))?,
            Output::Text => writeln!(out, "{}", line(key_id, &p, rate))?,
        }
        if p.finished {
            if redraw {
                writeln!(out)?;
            }
            out.flush()?;
            return Ok(finish(key_id, &p));
        }
        out.flush()?;
        drop(out);
        std::thread::sleep(POLL);
    }
}

/// A rotation that left instances failed has not done its job: exit 1, as a
/// deploy watcher would, so that a script notices.
fn finish(key_id: &str, p: &Progress) -> ExitCode {
    if p.failed > 0 {
        eprintln!(
            "keywarden: rotation of {key_id} to version {} finished with {} failed rewrap(s); see `keywarden key show {key_id}`, then run `keywarden key retry {key_id}`",
            p.version, p.failed
        );
        ExitCode::FAILURE
    } else {
        eprintln!("rotation of {key_id} to version {} finished: {} DEK(s) rewrapped", p.version, p.done);
        ExitCode::SUCCESS
    }
}

/// What the watch needs of the API's rotation view.
#[derive(Debug, Clone, PartialEq)]
struct Progress {
    version: String,
    state: String,
    total: Option<u64>,
    done: u64,
    failed: u64,
    remaining: Option<u64>,
    percent: f64,
    /// The API's whole-job rate, until the watch has its own.
    rate: f64,
    finished: bool,
}

impl Progress {
    fn from_json(v: &Value) -> Progress {
        let n = |k: &str| v[k].as_u64();
        Progress {
            version: v["target_version"].as_str().unwrap_or("?").to_string(),
            state: v["state"].as_str().unwrap_or("running").to_string(),
            total: n("total"),
            done: n("done").unwrap_or(0),
            failed: n("failed").unwrap_or(0),
            remaining: n("remaining"),
            percent: v["percent"].as_f64().unwrap_or(0.0),
            rate: v["rate_per_second"].as_f64().unwrap_or(0.0),
            finished: !v["finished_at"].is_null(),
        }
    }
}

fn line(key_id: &str, p: &Progress, rate: f64) -> String {
    let head = format!("{key_id} -> version {}", p.version);
    let Some(total) = p.total else {
        return format!("{head}: planning (counting the DEKs to rewrap)");
    };
    let filled = ((p.percent / 100.0) * BAR as f64).round().clamp(0.0, BAR as f64) as usize;
    let bar = format!("[{}{}]", "#".repeat(filled), "-".repeat(BAR - filled));
    let mut s = format!("{head} {bar} {}/{total} {:5.1}%  {}", p.done + p.failed, p.percent, rate_text(rate));
    if p.failed > 0 {
        s += &format!("  failed {}", p.failed);
    }
    match (p.finished, p.state.as_str(), p.remaining) {
        (true, _, _) => s += "  done",
        (false, "waiting_for_key", _) => s += "  paused: the key is not active",
        (false, _, Some(r)) if rate > 0.0 => s += &format!("  ETA {}", duration_text((r as f64 / rate).ceil() as u64)),
        _ => s += "  ETA -",
    }
    s
}

fn rate_text(rate: f64) -> String {
    if rate >= 10.0 {
        format!("{rate:.0}/s")
    } else {
        format!("{rate:.1}/s")
    }
}

fn duration_text(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// Recent (time, processed) samples, for a rate that follows the rotation.
#[derive(Default)]
struct Window(VecDeque<(Instant, u64)>);

impl Window {
    fn push(&mut self, at: Instant, processed: u64) {
        self.0.push_back((at, processed));
        while self.0.front().is_some_and(|(t, _)| at.duration_since(*t) > WINDOW) {
            self.0.pop_front();
        }
    }

    fn rate(&self) -> Option<f64> {
        let ((t0, n0), (t1, n1)) = (self.0.front()?, self.0.back()?);
        let secs = t1.duration_since(*t0).as_secs_f64();
        (secs >= 0.5).then(|| n1.saturating_sub(*n0) as f64 / secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn progress(done: u64, total: Option<u64>, state: &str, finished: bool) -> Progress {
        let percent = total.map_or(0.0, |t| if t == 0 { 100.0 } else { done as f64 * 100.0 / t as f64 });
        Progress::from_json(&json!({
            "target_version": "2", "state": state, "total": total, "done": done, "failed": 0,
            "remaining": total.map(|t| t - done), "percent": percent, "rate_per_second": 5.0,
            "finished_at": if finished { json!("2026-01-01T00:00:00Z") } else { Value::Null },
        }))
    }

    #[test]
    fn the_line_shows_bar_counts_rate_and_eta() {
        let l = line("k", &progress(500, Some(2000), "running", false), 250.0);
        assert_eq!(l, format!("k -> version 2 [{}{}] 500/2000  25.0%  250/s  ETA 6s", "#".repeat(8), "-".repeat(22)));
    }

    #[test]
    fn the_final_line_is_full_and_says_done() {
        let l = line("k", &progress(2000, Some(2000), "finished", true), 0.0);
        assert!(l.contains(&format!("[{}]", "#".repeat(30))) && l.contains("2000/2000 100.0%") && l.ends_with("done"), "{l}");
    }

    #[test]
    fn planning_and_paused_rotations_promise_nothing() {
        assert!(line("k", &progress(0, None, "planning", false), 0.0).ends_with("planning (counting the DEKs to rewrap)"));
        assert!(line("k", &progress(5, Some(10), "waiting_for_key", false), 3.0).ends_with("paused: the key is not active"));
        assert!(line("k", &progress(5, Some(10), "running", false), 0.0).ends_with("ETA -"));
    }

    #[test]
    fn the_rate_follows_the_last_seconds_only() {
        let start = Instant::now();
        let mut w = Window::default();
        w.push(start, 0);
        assert_eq!(w.rate(), None, "one sample is no rate");
        w.push(start + Duration::from_secs(5), 1000);
        assert_eq!(w.rate(), Some(200.0));
        w.push(start + Duration::from_secs(20), 1300);
        assert_eq!(w.rate(), None, "older samples fell out of the window");
        w.push(start + Duration::from_secs(22), 1500);
        assert_eq!(w.rate(), Some(100.0));
    }

    #[test]
    fn long_etas_read_as_hours_and_minutes() {
        assert_eq!(duration_text(42), "42s");
        assert_eq!(duration_text(125), "2m05s");
        assert_eq!(duration_text(7380), "2h03m");
    }
}
