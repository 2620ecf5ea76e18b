//! A rotation job as operators read it: the stored counters plus what they
//! imply (remaining, percent, rate, ETA), so that `key show --watch` and
//! dashboards need no arithmetic of their own.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::engine::{KeyStatus, RotationJob};

pub fn rotation_view(job: &RotationJob, key: KeyStatus, now: DateTime<Utc>) -> Value {
    let processed = job.done + job.failed;
    // A finished job has nothing left even if instances were deleted under it
    // (they are neither done nor failed).
    let remaining = if job.finished_at.is_some() { Some(0) } else { job.total.map(|t| t.saturating_sub(processed)) };
    let end = job.finished_at.unwrap_or(now);
    let elapsed = (end - job.started_at).to_std().unwrap_or_default().as_secs_f64();
    // Over the whole job: a restart or a pause lowers it, which is the truth about
    // when it will end if that happens again.
    let rate = if elapsed > 0.0 { processed as f64 / elapsed } else { 0.0 };
    let state = match (job.finished_at, job.total, key) {
        (Some(_), _, _) => "finished",
        (None, _, KeyStatus::Disabled | KeyStatus::Deleted) => "waiting_for_key",
        (None, None, _) => "planning",
        (None, Some(_), _) => "running",
    };
    let percent = match job.total {
        _ if job.finished_at.is_some() => 100.0,
        Some(0) => 100.0,
        Some(t) => (processed as f64 * 100.0 / t as f64).min(100.0),
        None => 0.0,
    };
    let eta = match (state, remaining) {
        ("finished", _) => Some(0.0),
        ("running", Some(r)) if rate > 0.0 => Some((r as f64 / rate).ceil()),
        _ => None,
    };
    let mut v = serde_json::to_value(job).expect("jobs serialize");
    let extra = json!({
        "state": state,
        "remaining": remaining,
        "percent": (percent * 10.0).round() / 10.0,
        "elapsed_seconds": (elapsed * 1000.0).round() / 1000.0,
        "rate_per_second": (rate * 10.0).round() / 10.0,
        "eta_seconds": eta,
    });
    if let (Value::Object(base), Value::Object(more)) = (&mut v, extra) {
        base.extend(more);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(total: Option<u64>, done: u64, failed: u64) -> RotationJob {
        RotationJob {
            key_id: "k".into(),
            target_version: "2".into(),
            cause_event_id: "e".into(),
            acknowledge: true,
            acknowledges: Vec::new(),
            correlation_id: None,
            traceparent: None,
            started_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            total,
            done,
            failed,
            finished_at: None,
            rewrapping_to: None,
            arrivals: 0,
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        "2026-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap() + chrono::Duration::seconds(secs)
    }

    #[test]
    fn a_running_rotation_reports_rate_and_eta_from_its_progress() {
        let v = rotation_view(&job(Some(1000), 180, 20), KeyStatus::Active, at(10));
        assert_eq!(v["state"], "running");
        assert_eq!(v["remaining"], 800);
        assert_eq!(v["percent"], 20.0);
        assert_eq!(v["rate_per_second"], 20.0);
        assert_eq!(v["eta_seconds"], 40.0);
        assert_eq!(v["started_at"], "2026-01-01T00:00:00Z");
    }

    #[test]
    fn a_paused_or_unplanned_rotation_promises_no_eta() {
        assert_eq!(rotation_view(&job(Some(10), 5, 0), KeyStatus::Disabled, at(5))["state"], "waiting_for_key");
        assert!(rotation_view(&job(Some(10), 5, 0), KeyStatus::Disabled, at(5))["eta_seconds"].is_null());
        let planning = rotation_view(&job(None, 0, 0), KeyStatus::Active, at(1));
        assert_eq!(planning["state"], "planning");
        assert!(planning["eta_seconds"].is_null());
    }

    #[test]
    fn a_finished_rotation_is_complete_and_keeps_its_rate() {
        let mut j = job(Some(0), 0, 0);
        j.finished_at = Some(at(2));
        let v = rotation_view(&j, KeyStatus::Active, at(100));
        assert_eq!((v["state"].as_str(), v["percent"].as_f64(), v["eta_seconds"].as_f64()), (Some("finished"), Some(100.0), Some(0.0)));
        let mut j = job(Some(400), 400, 0);
        j.finished_at = Some(at(4));
        assert_eq!(rotation_view(&j, KeyStatus::Active, at(100))["rate_per_second"], 100.0);
        let mut j = job(Some(400), 390, 0);
        j.finished_at = Some(at(4));
        let v = rotation_view(&j, KeyStatus::Active, at(100));
        assert_eq!((v["percent"].as_f64(), v["remaining"].as_u64()), (Some(100.0), Some(0)), "instances deleted during the rotation are not left to do");
    }
}
