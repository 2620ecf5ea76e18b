//! Text output of `keywarden key impact`: the answer first (what a disable or
//! delete would do), then the instances it would touch.

use serde_json::Value;

pub(super) fn print_text(v: &Value) {
    print!("{}", render(v));
}

fn render(v: &Value) -> String {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let inst = &v["instances"];
    let by = &inst["by_state"];
    let mut out = format!("key {} ({}, version {}, kms {})\n", s(&v["key_id"]), s(&v["state"]), s(&v["version"]), s(&v["kms_provider"]));
    out += &format!(
        "instances: {} (active {}, revoked {}, erased {}, destroyed {})\n",
        s(&inst["total"]),
        s(&by["active"]),
        s(&by["revoked"]),
        s(&by["erased"]),
        s(&by["destroyed"])
    );
    out += &format!("wrapped DEKs: {}  pending rewraps: {}  rewrap failures: {}\n", s(&v["wrapped_deks"]), s(&v["pending_rewraps"]), s(&v["rewrap_failures"]));
    if let Some(r) = v["rotation"].as_object() {
        out += &format!(
            "rotation to version {}: {} {}% ({} of {} done, {} failed)\n",
            s(&r["target_version"]),
            s(&r["state"]),
            s(&r["percent"]),
            s(&r["done"]),
            s(&r["total"]),
            s(&r["failed"])
        );
    }
    out += &format!("if disabled: {}\n", s(&v["disable"]["effect"]));
    out += &format!("if deleted:  {}\n", s(&v["delete"]["effect"]));
    let dp = &v["data_plane"];
    out += &format!(
        "data plane: commands go to topic {} keyed by {}; a disable sends {} {} and a delete {} {} command(s)\n",
        s(&dp["commands_topic"]),
        s(&dp["message_key"]),
        s(&v["disable"]["commands"]),
        s(&v["disable"]["command"]),
        s(&v["delete"]["commands"]),
        s(&v["delete"]["command"])
    );
    let listed = inst["listed"].as_array().map(Vec::as_slice).unwrap_or_default();
    for i in listed {
        out += &format!("  {}\t{}\tversion {}\n", s(&i["instance_id"]), s(&i["state"]), s(&i["key_version"]));
    }
    let total = inst["total"].as_u64().unwrap_or(0) as usize;
    if total > listed.len() {
        out += &format!("  … {} more not listed (--limit N)\n", total - listed.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_leads_with_the_consequences_and_says_what_was_left_out() {
        let v = json!({
            "key_id": "k", "state": "active", "version": "2", "kms_provider": "local",
            "instances": {"total": 3, "by_state": {"active": 2, "revoked": 0, "erased": 0, "destroyed": 1},
                          "listed": [{"instance_id": "a", "state": "active", "key_version": "2"}], "truncated": true},
            "wrapped_deks": 2, "pending_rewraps": 0, "rewrap_failures": 0, "rotation": null,
            "disable": {"command": "revoke", "commands": 2, "effect": "2 instance(s) become revoked"},
            "delete": {"command": "erase", "commands": 2, "effect": "2 instance(s) become erased"},
            "data_plane": {"commands_topic": "instance-commands", "message_key": "instance_id"},
        });
        let text = render(&v);
        assert!(text.starts_with("key k (active, version 2, kms local)\n"), "{text}");
        assert!(text.contains("instances: 3 (active 2, revoked 0, erased 0, destroyed 1)"), "{text}");
        assert!(text.contains("if disabled: 2 instance(s) become revoked"), "{text}");
        assert!(text.contains("topic instance-commands keyed by instance_id; a disable sends 2 revoke and a delete 2 erase"), "{text}");
        assert!(text.contains("  a\tactive\tversion 2\n"), "{text}");
        assert!(text.contains("2 more not listed"), "{text}");
        assert!(!text.contains("rotation"), "{text}");
    }
}
