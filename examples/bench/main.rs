//! keywarden's benchmark suite: rotation throughput, revocation
//! latency, intake rate, KMS quota use, DEK fetch, scale and recovery (issue 7),
//! a real MariaDB stopped and started by the agent (B8, issue 14), each
//! against a real tansu broker and the real keywarden binary, and each as a
//! ratio to a baseline measured in the same run or as a latency distribution.
//!
//!     cargo run --release --example bench            # the full suite (< 10 min)
//!     cargo run --release --example bench -- --quick # tiny sizes: checks it runs
//!     cargo run --release --example bench -- B1 B3   # some of them
//!
//! It prints figures; it asserts nothing about speed. Needs `tansu` on PATH, and
//! for B8 mariadbd with its HashiCorp key plugin
//! (scripts/install-test-deps.sh).

mod b8_mariadb;
mod cases;
mod fake_kms;
mod harness;

use std::time::Instant;

/// The daemon's allocator, so that the in-process baselines allocate as it does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub struct Sizes {
    pub b1_instances: usize,
    pub b2_cycles: usize,
    pub b2_big: usize,
    pub b3_events: usize,
    pub b4_instances: usize,
    pub b5_seconds: u64,
    pub b6_instances: usize,
    pub b7_kills: usize,
    /// B8's disable/enable cycles of a real MariaDB, and of its baseline.
    pub b8_cycles: usize,
    /// How long each B9 phase (healthy, hung) fetches DEKs.
    pub b9_seconds: u64,
    /// How long B6 lets the daemon run (monitor, status line) before the scrape.
    pub b6_settle: std::time::Duration,
}

const FULL: Sizes = Sizes {
    b1_instances: 100_000,
    b2_cycles: 200,
    b2_big: 10_000,
    b3_events: 200_000,
    b4_instances: 20_000,
    b5_seconds: 5,
    b6_instances: 1_000_000,
    b7_kills: 10,
    b8_cycles: 50,
    b9_seconds: 10,
    b6_settle: std::time::Duration::from_secs(6),
};

const QUICK: Sizes = Sizes {
    b1_instances: 1_000,
    b2_cycles: 3,
    b2_big: 100,
    b3_events: 1_000,
    b4_instances: 300,
    b5_seconds: 1,
    b6_instances: 2_000,
    b7_kills: 1,
    b8_cycles: 2,
    b9_seconds: 1,
    b6_settle: std::time::Duration::from_millis(500),
};

/// One line of the table.
pub struct Row {
    pub id: &'static str,
    pub what: String,
    pub figure: String,
    pub baseline: String,
    pub ratio: String,
    pub target: String,
    pub met: Option<bool>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only: Vec<String> = args.iter().filter(|a| !a.starts_with("--")).map(|a| a.to_uppercase()).collect();
    let sizes = if quick { &QUICK } else { &FULL };
    let started = Instant::now();
    let bin = match harness::keywarden_bin() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    eprintln!("bench: keywarden binary {}; {} mode", bin.display(), if quick { "quick" } else { "full" });
    type Case = fn(&std::path::Path, &Sizes) -> harness::Res<Vec<Row>>;
    let cases: [(&str, Case); 9] = [
        ("B1", cases::b1_rotation),
        ("B2", cases::b2_revocation),
        ("B3", cases::b3_intake),
        ("B4", cases::b4_remote_quota),
        ("B5", cases::b5_dek_fetch),
        ("B6", cases::b6_scale),
        ("B7", cases::b7_recovery),
        ("B8", b8_mariadb::b8_mariadb),
        ("B9", cases::b9_hung_broker),
    ];
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (id, case) in cases {
        if !only.is_empty() && !only.iter().any(|o| o == id) {
            continue;
        }
        let t = Instant::now();
        eprintln!("bench: {id} ...");
        match case(&bin, sizes) {
            Ok(r) => {
                for row in &r {
                    eprintln!("bench: {id}: {} = {} (baseline {}, ratio {})", row.what, row.figure, row.baseline, row.ratio);
                }
                rows.extend(r);
            }
            Err(e) => {
                eprintln!("bench: {id} FAILED: {e}");
                failed.push(id);
            }
        }
        eprintln!("bench: {id} took {:.1?}", t.elapsed());
    }
    print_table(&rows);
    println!("\nsuite took {:.1?}{}", started.elapsed(), if quick { " (quick mode: sizes are tiny; the figures mean nothing)" } else { "" });
    if !failed.is_empty() {
        eprintln!("bench: failed: {}", failed.join(", "));
        std::process::exit(1);
    }
}

fn print_table(rows: &[Row]) {
    println!("\n| # | what | figure | baseline (same run) | ratio | target | met |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        println!("| {} | {} | {} | {} | {} | {} | {} |", r.id, r.what, r.figure, r.baseline, r.ratio, r.target, met);
    }
}
