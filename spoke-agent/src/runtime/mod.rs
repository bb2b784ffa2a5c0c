//! Runtimes: what actually runs a cluster's VMs. Each one reports inventory (`InventorySource`)
//! and carries out the hub's commands: VM lifecycle here, migrations through the agent's
//! migration controller (`QemuAgent`).

pub mod qemu;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use drover_shared::commands::{AgentCommand, CommandOutcome};

use crate::commands::CommandHandler;

/// VM lifecycle commands on the qemu runtime.
async fn lifecycle(runtime: &qemu::QemuRuntime, command: AgentCommand) -> CommandOutcome {
    let result = match command {
        AgentCommand::CreateVm { spec } => runtime.create_vm(spec).await,
        AgentCommand::StartVm { namespace, name } => runtime.start_vm(&namespace, &name).await,
        AgentCommand::StopVm {
            namespace,
            name,
            grace_period_secs,
        } => {
            runtime
                .stop_vm(
                    &namespace,
                    &name,
                    Duration::from_secs(grace_period_secs as u64),
                )
                .await
        }
        AgentCommand::DeleteVm { namespace, name } => runtime.delete_vm(&namespace, &name).await,
        other => {
            return CommandOutcome::Failed {
                reason: format!("{} is not a lifecycle command", other.kind()),
            }
        }
    };
    match result {
        Ok(message) => CommandOutcome::Succeeded { message },
        Err(e) => CommandOutcome::Failed {
            reason: e.to_string(),
        },
    }
}

impl CommandHandler for qemu::QemuRuntime {
    fn execute(
        &self,
        command: AgentCommand,
    ) -> Pin<Box<dyn Future<Output = CommandOutcome> + Send + '_>> {
        Box::pin(lifecycle(self, command))
    }
}
