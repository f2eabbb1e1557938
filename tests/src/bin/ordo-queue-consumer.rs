//! `ordo-queue-consumer`: one queue consumer as a process, for the multi-process queue tests
//! (see `ordo_tests::queue_consumer`).
//!
//! ```text
//! ordo-queue-consumer --endpoints A,B,C --queue Q --consumer C
//!                     [--max-in-flight N] [--visibility-ms N]
//!                     [--process-min-ms N] [--process-max-ms N]
//! ```

use std::time::Duration;

use anyhow::{Context, Result, bail};
use ordo_tests::queue_consumer::{ConsumerConfig, run_consumer};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut config = ConsumerConfig {
        endpoints: Vec::new(),
        queue: String::new(),
        consumer: String::new(),
        max_in_flight: 20,
        visibility: Duration::ZERO,
        process_min: Duration::ZERO,
        process_max: Duration::ZERO,
    };
    let millis = |flag: &str, value: &str| -> Result<Duration> {
        Ok(Duration::from_millis(
            value.parse().context(flag.to_owned())?,
        ))
    };
    for pair in args.chunks(2) {
        let [flag, value] = pair else {
            bail!("flag {:?} has no value", pair[0]);
        };
        match flag.as_str() {
            "--endpoints" => config.endpoints = value.split(',').map(str::to_owned).collect(),
            "--queue" => config.queue = value.clone(),
            "--consumer" => config.consumer = value.clone(),
            "--max-in-flight" => config.max_in_flight = value.parse().context(flag.clone())?,
            "--visibility-ms" => config.visibility = millis(flag, value)?,
            "--process-min-ms" => config.process_min = millis(flag, value)?,
            "--process-max-ms" => config.process_max = millis(flag, value)?,
            other => bail!("unknown flag {other}"),
        }
    }
    if config.endpoints.is_empty() || config.queue.is_empty() || config.consumer.is_empty() {
        bail!("--endpoints, --queue and --consumer are required");
    }
    run_consumer(config).await
}
