//! `ordo serve`: runs one node. This module is the CLI's only contact with the server crate,
//! which owns configuration, ports and shutdown on SIGTERM or Ctrl-C.

use anyhow::Context;

/// Runs a node until it is asked to stop.
pub async fn run(args: ordo_server::ServeArgs) -> anyhow::Result<()> {
    ordo_server::run(args).await.context("node failed")
}
