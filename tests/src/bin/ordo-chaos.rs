//! `ordo-chaos`: the long chaos run by hand (`scripts/chaos` builds and runs it) and the checker
//! of a history file.
//!
//! ```text
//! ordo-chaos run [--minutes N] [--seconds N] [--seed S] [--nodes 3|5] [--keep] [--work-dir D]
//!                [--no-idempotence]
//! ordo-chaos check HISTORY.jsonl
//! ```
//!
//! Exits 0 when the checker finds nothing, 1 when it finds a violation, 2 on a harness error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ordo_tests::chaos::{
    ChaosConfig, checker, fault_kinds, history, parse_faults, run_until_signal,
};

const USAGE: &str = "usage: ordo-chaos run [--minutes N] [--seconds N] [--seed S] [--nodes 3|5] [--keep] [--disk-strict] [--faults LIST] [--work-dir DIR] [--no-idempotence]\n       ordo-chaos check HISTORY.jsonl\n\n--faults: kinds to inject (kill,pause) or to leave out (-disk-full,-packet-loss)\n--no-idempotence: producers without producer sequences; duplicates are counted, not violations";

fn main() -> ExitCode {
    match main_inner() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("ordo-chaos: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn main_inner() -> Result<bool> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") => {
            let [_, path] = args.as_slice() else {
                bail!("{USAGE}");
            };
            let lines = history::read_history(&PathBuf::from(path))?;
            let report = checker::check(&lines);
            println!("{}", report.render());
            Ok(report.passed())
        }
        Some("run") => {
            let mut seconds = 30 * 60;
            let mut seed = None;
            let mut nodes = 3;
            let mut keep = false;
            let mut disk_strict = false;
            let mut faults = None;
            let mut work_dir = None;
            let mut idempotent = true;
            // `--flag=value` is `--flag value`.
            let split: Vec<String> = args[1..]
                .iter()
                .flat_map(|arg| match arg.split_once('=') {
                    Some((flag, value)) if flag.starts_with("--") => {
                        vec![flag.to_owned(), value.to_owned()]
                    }
                    _ => vec![arg.clone()],
                })
                .collect();
            let mut rest = split.iter();
            while let Some(flag) = rest.next() {
                let mut value = || rest.next().with_context(|| format!("{flag} needs a value"));
                match flag.as_str() {
                    "--minutes" => seconds = value()?.parse::<u64>()? * 60,
                    "--seconds" => seconds = value()?.parse()?,
                    "--seed" => seed = Some(value()?.parse()?),
                    "--nodes" => nodes = value()?.parse()?,
                    "--work-dir" => work_dir = Some(PathBuf::from(value()?)),
                    "--keep" => keep = true,
                    "--disk-strict" => disk_strict = true,
                    "--no-idempotence" => idempotent = false,
                    "--faults" => faults = Some(parse_faults(value()?)?),
                    other => bail!("unknown flag {other}\n{USAGE}"),
                }
            }
            let seed = seed.unwrap_or_else(rand::random);
            let mut config = ChaosConfig::new(seed, nodes, Duration::from_secs(seconds))?;
            config.keep = keep;
            config.disk_strict = disk_strict;
            if let Some(faults) = faults {
                config.faults = faults;
            }
            config.work_dir = work_dir;
            config.idempotent = idempotent;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let outcome = runtime.block_on(run_until_signal(config))?;
            outcome.print();
            Ok(outcome.report.passed())
        }
        _ => bail!("{USAGE}\nfaults: {}", fault_kinds().join(", ")),
    }
}
