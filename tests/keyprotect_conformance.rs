//! The Key Protect double is judged by IBM's client, not by keywarden: IBM's
//! official Python client (`keyprotect` on PyPI, with `ibm-cloud-sdk-core`'s
//! IAM authenticator, which parses the token as a JWT) drives it through the
//! documented requests, and any refusal of one fails the test. Then the double
//! must refuse what the service refuses.

#[path = "common/keyprotect_double.rs"]
mod keyprotect_double;

mod common;

use common::required;
use keyprotect_double::{KeyProtectDouble, API_KEY, INSTANCE, SERVICE_API_KEY};
use serde_json::Value;

/// Every call a customer makes on a root key, in an order the key states
/// allow; prints one JSON line of what each returned.
const CLIENT: &str = r#"
import json, sys, base64, time
from ibm_cloud_sdk_core.authenticators import IAMAuthenticator
from keyprotect import IbmKeyProtectApiV2
url, instance, api_key = sys.argv[1], sys.argv[2], sys.argv[3]
kp = IbmKeyProtectApiV2(authenticator=IAMAuthenticator(api_key, url=url))
kp.set_service_url(url)
out = {}
def body(kind, resource):
    return json.dumps({"metadata": {"collectionType": kind, "collectionTotal": 1}, "resources": [resource]})
r = kp.create_key(instance, body("application/vnd.ibm.kms.key+json",
    {"type": "application/vnd.ibm.kms.key+json", "name": "conformance", "extractable": False}), prefer="return=representation")
key = r.get_result()["resources"][0]["id"]
out["create"] = r.get_status_code()
out["metadata"] = kp.get_key_metadata(key, instance).get_result()["resources"][0]
out["get"] = kp.get_key(key, instance).get_status_code()
dek = base64.b64encode(b"k" * 32).decode()
w = kp.wrap_key(key, instance, key_action_wrap_body=json.dumps({"plaintext": dek, "aad": ["inst-1"]})).get_result()
u = kp.unwrap_key(key, instance, json.dumps({"ciphertext": w["ciphertext"], "aad": ["inst-1"]})).get_result()
out["unwrap_matches"] = u["plaintext"] == dek
out["rotate"] = kp.rotate_key(key, instance).get_status_code()
rw = kp.rewrap_key(key, instance, json.dumps({"ciphertext": w["ciphertext"], "aad": ["inst-1"]})).get_result()
out["rewrapped_to_new_version"] = rw["rewrappedKeyVersion"]["id"] != w["keyVersion"]["id"]
u2 = kp.unwrap_key(key, instance, json.dumps({"ciphertext": rw["ciphertext"], "aad": ["inst-1"]})).get_result()
out["rewrapped_unwraps"] = u2["plaintext"] == dek
out["disable"] = kp.disable_key(key, instance).get_status_code()
out["disabled_state"] = kp.get_key_metadata(key, instance).get_result()["resources"][0]["state"]
time.sleep(1.2)
out["enable"] = kp.enable_key(key, instance).get_status_code()
d = kp.delete_key(key, instance, prefer="return=representation")
out["delete"] = d.get_status_code()
m = kp.get_key_metadata(key, instance).get_result()["resources"][0]
out["deleted"] = [m["state"], m["deleted"], "deletionDate" in m]
time.sleep(1.2)
out["restore"] = kp.restore_key(key, instance).get_status_code()
out["restored_state"] = kp.get_key_metadata(key, instance).get_result()["resources"][0]["state"]
try:
    kp.sync_associated_resources(key, instance)
    out["sync_after_action"] = 204
except Exception as e:
    out["sync_after_action"] = getattr(e, "code", str(e))
fresh = kp.create_key(instance, body("application/vnd.ibm.kms.key+json",
    {"type": "application/vnd.ibm.kms.key+json", "name": "fresh", "extractable": False})).get_result()["resources"][0]["id"]
out["sync_fresh"] = kp.sync_associated_resources(fresh, instance).get_status_code()
out["key"] = key
print(json.dumps(out))
"#;

/// Requests the service refuses: made with plain `requests`, since IBM's
/// client has no registration or event_ack calls.
const STRICT: &str = r#"
import json, sys, requests
url, instance, key, customer, service = sys.argv[1:6]
def token(path, k):
    return requests.post(url + path, data={"grant_type": "urn:ibm:params:oauth:grant-type:apikey", "apikey": k}).json()["access_token"]
c, s = token("/oidc/token", customer), token("/identity/token", service)
h = lambda t, **x: dict({"authorization": "Bearer " + t, "bluemix-instance": instance}, **x)
reg = url + "/api/v2/keys/" + key + "/registrations/" + requests.utils.quote("crn:v1:bluemix:public:databases-for-x:us-south:a/acct:db-instance::", safe="")
body = json.dumps({"metadata": {"collectionType": "application/vnd.ibm.kms.registration_input+json", "collectionTotal": 1}, "resources": [{"preventKeyDeletion": False}]})
ack = lambda e: json.dumps({"metadata": {"collectionType": "application/vnd.ibm.kms.event_acknowledge+json", "collectionTotal": 1},
    "resources": [{"eventId": e, "adopterKeyState": "DEK_DISABLED", "timestamp": "2026-12-01T00:00:00Z"}]})
out = {}
out["registration_by_customer"] = requests.post(reg, headers=h(c), data=body).status_code
out["registration_by_service"] = requests.put(reg, headers=h(s), data=body).status_code
out["bare_resource"] = requests.post(url + "/api/v2/keys/" + key + "/registrations/db-instance", headers=h(s), data=body).status_code
out["ack_unknown_event"] = requests.post(url + "/api/v2/event_ack", headers=h(s), data=ack("my-own-id")).status_code
out["wrap_without_content_type"] = requests.post(url + "/api/v2/keys/" + key + "/actions/wrap", headers=h(c), data=json.dumps({"plaintext": "a2V5a2V5a2V5a2V5"})).status_code
requests.post(url + "/api/v2/keys/" + key + "/actions/disable", headers=h(c))
out["enable_too_soon"] = requests.post(url + "/api/v2/keys/" + key + "/actions/enable", headers=h(c)).status_code
out["wrap_suspended"] = requests.post(url + "/api/v2/keys/" + key + "/actions/wrap", headers=h(c), json={"plaintext": "a2V5"}).status_code
out["registration_delete_suspended"] = requests.delete(reg, headers=h(s)).status_code
rotated = sys.argv[6]
def ack_rotated(state_data):
    return json.dumps({"metadata": {"collectionType": "application/vnd.ibm.kms.event_acknowledge+json", "collectionTotal": 1},
        "resources": [{"eventId": rotated, "adopterKeyState": "DEK_ENABLED", "timestamp": "2026-12-01T00:00:00Z", "keyStateData": state_data}]})
out["ack_rewrapped_key_version"] = requests.post(url + "/api/v2/event_ack", headers=h(s), data=ack_rotated({"rewrappedKeyVersion": "v"})).status_code
out["ack_key_version"] = requests.post(url + "/api/v2/event_ack", headers=h(s), data=ack_rotated({"keyVersion": "v"})).status_code
out["ack_by_customer"] = requests.post(url + "/api/v2/event_ack", headers=h(c), data=ack_rotated({"keyVersion": "v"})).status_code
print(json.dumps(out))
"#;

/// Raw calls on one key: `wrap` prints a ciphertext, `expired` the statuses
/// of unwrap, rewrap and wrap, `metadata` the status of a metadata read.
const STATE3: &str = r#"
import sys, json, requests
url, instance, key, api_key, step, arg = sys.argv[1:7]
t = requests.post(url + "/identity/token", data={"grant_type": "urn:ibm:params:oauth:grant-type:apikey", "apikey": api_key}).json()["access_token"]
h = {"authorization": "Bearer " + t, "bluemix-instance": instance, "content-type": "application/vnd.ibm.kms.key_action+json"}
act = lambda a, b: requests.post(url + "/api/v2/keys/" + key + "/actions/" + a, headers=h, data=json.dumps(b))
if step == "wrap":
    print(act("wrap", {"plaintext": "a2V5a2V5a2V5a2V5", "aad": ["i"]}).json()["ciphertext"])
elif step == "expired":
    print(act("unwrap", {"ciphertext": arg, "aad": ["i"]}).status_code, act("rewrap", {"ciphertext": arg, "aad": ["i"]}).status_code,
          act("wrap", {"plaintext": "a2V5", "aad": ["i"]}).status_code)
else:
    print(requests.get(url + "/api/v2/keys/" + key + "/metadata", headers=h).status_code)
"#;

#[test]
fn ibm_python_client_is_served_by_the_key_protect_double() {
    let probe = std::process::Command::new("python3").args(["-c", "import keyprotect, ibm_cloud_sdk_core"]).output().ok().filter(|o| o.status.success());
    if required(probe, "the keyprotect Python client", "pip install keyprotect (scripts/install-test-deps.sh)").is_none() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let double = KeyProtectDouble::start(&rt, "us-south");
    // The documented 30 s between an action and an enable or restore, shortened
    // so that the run takes seconds; the rule itself is checked below.
    *double.kp.action_gap.lock().unwrap() = std::time::Duration::from_secs(1);
    let out = std::process::Command::new("python3").args(["-c", CLIENT, &double.url, INSTANCE, API_KEY]).output().expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "IBM's client failed against the double: {}\n{stdout}\nrefused: {:?}",
        String::from_utf8_lossy(&out.stderr),
        double.refusals()
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    println!("python keyprotect client against the double: {v}");
    assert_eq!(v["create"], 201);
    assert_eq!(v["get"], 200);
    assert_eq!(v["metadata"]["state"], 1);
    assert_eq!(v["unwrap_matches"], true);
    assert_eq!(v["rotate"], 204);
    assert_eq!(v["rewrapped_to_new_version"], true);
    assert_eq!(v["rewrapped_unwraps"], true);
    assert_eq!(v["disable"], 204);
    assert_eq!(v["disabled_state"], 2);
    assert_eq!(v["enable"], 204);
    assert_eq!(v["delete"], 200);
    assert_eq!(v["deleted"], serde_json::json!([5, true, true]));
    assert_eq!(v["restore"], 201);
    assert_eq!(v["restored_state"], 1);
    // [sync]: a lifecycle action within the hour answers 409, a documented refusal.
    assert_eq!(v["sync_after_action"], 409);
    assert_eq!(v["sync_fresh"], 204);
    let refused: Vec<String> = double.refusals().into_iter().filter(|r| !r.contains("/actions/sync")).collect();
    assert!(refused.is_empty(), "documented requests refused: {refused:?}");

    // As strict as the service: the Go client's token path, service-only calls,
    // state rules, issued event ids, the 30 s gap, 404 after a purge.
    let key = v["key"].as_str().unwrap().to_string();

    *double.kp.action_gap.lock().unwrap() = std::time::Duration::from_secs(30);
    let rotated = double
        .kp
        .events
        .lock()
        .unwrap()
        .iter()
        .find(|(_, _, action)| action == "rotate")
        .map(|(id, _, _)| id.clone())
        .expect("the client's rotation issued an event");
    let out =
        std::process::Command::new("python3").args(["-c", STRICT, &double.url, INSTANCE, &key, API_KEY, SERVICE_API_KEY, &rotated]).output().expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    println!("the double's refusals of undocumented requests: {s}");
    assert_eq!(s["wrap_without_content_type"], 200, "[python]: the Go client sends no content type");
    assert_eq!(s["registration_by_customer"], 403, "[errors] 30: service to service only");
    assert_eq!(s["registration_by_service"], 201);
    assert_eq!(s["bare_resource"], 400, "a registration names a resource CRN");
    assert_eq!(s["ack_unknown_event"], 404, "an ack names an event Key Protect issued");
    assert_eq!(s["enable_too_soon"], 409, "[errors] 26");
    assert_eq!(s["wrap_suspended"], 409, "[key-states]");
    assert_eq!(s["registration_delete_suspended"], 204, "[registration]: delete while suspended");
    assert_eq!((s["ack_rewrapped_key_version"].as_u64(), s["ack_key_version"].as_u64()), (Some(204), Some(204)), "[rewrap] and [api-cli] ack forms");
    assert_eq!(s["ack_by_customer"], 403, "[api-cli]: event_ack is service to service");

    // [key-states]: Deactivated (3) unwraps and rewraps but does not wrap;
    // [delete-purge]: after a purge, 404.
    let k = "expiring";
    double.add_key(k);
    let call = |step: &str, arg: &str| {
        let out = std::process::Command::new("python3").args(["-c", STATE3, &double.url, INSTANCE, k, API_KEY, step, arg]).output().expect("python3");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let ciphertext = call("wrap", "");
    double.expire(k);
    let expired = call("expired", &ciphertext);
    println!("deactivated key (unwrap, rewrap, wrap): {expired}");
    assert_eq!(expired, "200 200 409");
    double.set_state(k, 5, "delete");
    double.purge(k);
    assert_eq!(call("metadata", ""), "404", "[delete-purge]: every call on a purged key is 404");
    drop(rt);
}
