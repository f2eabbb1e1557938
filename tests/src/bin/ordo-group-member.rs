//! `ordo-group-member`: one consumer group member as a process, for the multi-process group
//! tests (see `ordo_tests::group_member`).
//!
//! ```text
//! ordo-group-member --endpoints A,B,C --group G --topic T --member M
//!                   [--session-timeout-ms N] [--commit-every N] [--pause-ms N]
//!                   [--fetch-max-bytes N]
//! ```

use std::time::Duration;

use anyhow::{Context, Result, bail};
use ordo_tests::group_member::{MemberConfig, run_member};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut config = MemberConfig {
        endpoints: Vec::new(),
        group: String::new(),
        topic: String::new(),
        member_id: String::new(),
        session_timeout: Duration::from_secs(3),
        commit_every: 1,
        pause_per_batch: Duration::ZERO,
        fetch_max_bytes: 1 << 20,
    };
    let mut pairs = args.chunks(2);
    for pair in &mut pairs {
        let [flag, value] = pair else {
            bail!("flag {:?} has no value", pair[0]);
        };
        match flag.as_str() {
            "--endpoints" => config.endpoints = value.split(',').map(str::to_owned).collect(),
            "--group" => config.group = value.clone(),
            "--topic" => config.topic = value.clone(),
            "--member" => config.member_id = value.clone(),
            "--session-timeout-ms" => {
                config.session_timeout =
                    Duration::from_millis(value.parse().context(flag.clone())?);
            }
            "--commit-every" => config.commit_every = value.parse().context(flag.clone())?,
            "--pause-ms" => {
                config.pause_per_batch =
                    Duration::from_millis(value.parse().context(flag.clone())?);
            }
            "--fetch-max-bytes" => config.fetch_max_bytes = value.parse().context(flag.clone())?,
            other => bail!("unknown flag {other}"),
        }
    }
    if config.endpoints.is_empty() || config.group.is_empty() || config.topic.is_empty() {
        bail!("--endpoints, --group and --topic are required");
    }
    run_member(config).await
}
