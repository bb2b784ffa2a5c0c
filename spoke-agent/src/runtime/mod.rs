//! Runtimes: what actually runs a cluster's VMs. Each one reports inventory (`InventorySource`)
//! and carries out the hub's VM lifecycle commands (`CommandHandler`).

pub mod qemu;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use drover_shared::commands::{AgentCommand, CommandOutcome};

use crate::commands::CommandHandler;

impl CommandHandler for qemu::QemuRuntime {
    fn execute(
        &self,
        command: AgentCommand,
    ) -> Pin<Box<dyn Future<Output = CommandOutcome> + Send + '_>> {
        Box::pin(async move {
            let result = match command {
                AgentCommand::CreateVm { spec } => self.create_vm(spec).await,
                AgentCommand::StartVm { namespace, name } => self.start_vm(&namespace, &name).await,
                AgentCommand::StopVm {
                    namespace,
                    name,
                    grace_period_secs,
                } => {
                    self.stop_vm(
                        &namespace,
                        &name,
                        Duration::from_secs(grace_period_secs as u64),
                    )
                    .await
                }
                AgentCommand::DeleteVm { namespace, name } => {
                    self.delete_vm(&namespace, &name).await
                }
            };
            match result {
                Ok(message) => CommandOutcome::Succeeded { message },
                Err(e) => CommandOutcome::Failed {
                    reason: e.to_string(),
                },
            }
        })
    }
}
