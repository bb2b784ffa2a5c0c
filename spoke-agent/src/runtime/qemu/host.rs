//! Facts about the host the QEMU runtime runs on: its node name, CPU, memory, kernel, QEMU
//! version and whether KVM is usable. Read from /proc and the QEMU binary once, at `open`.

use std::path::Path;
use std::time::Duration;

use super::Accel;

/// What `qemu-system-x86_64 --version` may take before it counts as broken.
const VERSION_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The accelerator actually used, with the CPU model that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResolvedAccel {
    Kvm,
    Tcg,
}

impl ResolvedAccel {
    pub(crate) fn as_qemu_arg(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }

    /// The `-cpu` model. Both sides of a live migration must present the same virtual CPU.
    /// Two agents on one host resolve the same accelerator and run the same QEMU binary, so
    /// `host` (KVM: the host's CPU passed through) and `max` (TCG: everything QEMU can emulate)
    /// describe identical CPUs on both sides. Migrating between *different* hosts needs a named
    /// model both support (e.g. a common baseline); the inventory reports the model in
    /// `cpu_models` so the hub can refuse pairs that do not match.
    pub(crate) fn cpu_model(self) -> &'static str {
        match self {
            Self::Kvm => "host",
            Self::Tcg => "max",
        }
    }
}

/// `Auto` picks KVM when /dev/kvm can be opened for reading and writing (what QEMU needs).
pub(crate) fn resolve_accel(accel: Accel) -> ResolvedAccel {
    match accel {
        Accel::Kvm => ResolvedAccel::Kvm,
        Accel::Tcg => ResolvedAccel::Tcg,
        Accel::Auto => {
            let usable = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
            if usable {
                ResolvedAccel::Kvm
            } else {
                ResolvedAccel::Tcg
            }
        }
    }
}

/// The host as the inventory describes it.
#[derive(Debug, Clone)]
pub(crate) struct HostFacts {
    pub node_name: String,
    pub cpu_model: String,
    pub memory_bytes: u64,
    pub cpu_millis: u64,
    pub kernel_release: String,
}

impl HostFacts {
    pub(crate) fn read() -> Self {
        let hostname = read_trimmed("/proc/sys/kernel/hostname").unwrap_or_default();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        Self {
            node_name: node_name_from_hostname(&hostname),
            cpu_model: cpu_model_from_cpuinfo(&cpuinfo),
            memory_bytes: mem_total_from_meminfo(&meminfo),
            cpu_millis: cpus * 1000,
            kernel_release: read_trimmed("/proc/sys/kernel/osrelease")
                .unwrap_or_else(|| "unknown".into()),
        }
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// A host name as a DNS-1123 subdomain (what node names must be): lowercase, anything else
/// becomes '-', labels trimmed to 63 characters, the whole to 253; "localhost" if nothing is left.
pub(crate) fn node_name_from_hostname(hostname: &str) -> String {
    let lower = hostname.trim().to_ascii_lowercase();
    let mut labels: Vec<String> = Vec::new();
    for label in lower.split('.') {
        let cleaned: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_lowercase() || c.is_ascii_digit() {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let cleaned: String = cleaned.trim_matches('-').chars().take(63).collect();
        let cleaned = cleaned.trim_end_matches('-').to_owned();
        if cleaned.is_empty() {
            continue;
        }
        let length_with = labels.iter().map(|l| l.len() + 1).sum::<usize>() + cleaned.len();
        if length_with > 253 {
            break;
        }
        labels.push(cleaned);
    }
    if labels.is_empty() {
        "localhost".into()
    } else {
        labels.join(".")
    }
}

pub(crate) fn cpu_model_from_cpuinfo(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_owned())
        })
        .filter(|m| !m.is_empty())
        .map(|m| m.chars().filter(|c| !c.is_control()).take(128).collect())
        .unwrap_or_else(|| "unknown".into())
}

pub(crate) fn mem_total_from_meminfo(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix("MemTotal:")?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

/// "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u7)" -> "7.2.19".
pub(crate) fn parse_qemu_version(output: &str) -> Option<String> {
    let rest = &output[output.find("version ")? + "version ".len()..];
    let version: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let version = version.trim_end_matches('.');
    (!version.is_empty()).then(|| version.to_owned())
}

/// Runs `<qemu> --version`; the error says what to install or configure.
pub(crate) async fn probe_qemu_version(qemu_binary: &Path) -> Result<String, String> {
    let run = tokio::process::Command::new(qemu_binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(VERSION_PROBE_TIMEOUT, run).await {
        Err(_) => {
            return Err(format!(
                "{} --version did not answer within {VERSION_PROBE_TIMEOUT:?}",
                qemu_binary.display()
            ))
        }
        Ok(Err(e)) => {
            return Err(format!(
            "cannot run {}: {e}; install QEMU (Debian: qemu-system-x86) or pass the binary's path",
            qemu_binary.display()
        ))
        }
        Ok(Ok(output)) => output,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{} --version failed ({}): {}",
            qemu_binary.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    parse_qemu_version(&stdout).ok_or_else(|| {
        format!(
            "cannot read a version from {} --version: {:?}",
            qemu_binary.display(),
            stdout.trim()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_become_dns1123_node_names() {
        assert_eq!(node_name_from_hostname("VM\n"), "vm");
        assert_eq!(
            node_name_from_hostname("My_Host.Example.COM"),
            "my-host.example.com"
        );
        assert_eq!(node_name_from_hostname("-odd-.."), "odd");
        assert_eq!(node_name_from_hostname("___"), "localhost");
        let long = "a".repeat(80);
        assert_eq!(node_name_from_hostname(&long).len(), 63);
        for name in ["VM", "My_Host.Example.COM", "-odd-..", &long] {
            drover_shared::ids::check_dns1123_subdomain("node", &node_name_from_hostname(name))
                .unwrap();
        }
    }

    #[test]
    fn proc_files_are_parsed() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n";
        assert_eq!(
            cpu_model_from_cpuinfo(cpuinfo),
            "Intel(R) Xeon(R) CPU @ 2.20GHz"
        );
        assert_eq!(cpu_model_from_cpuinfo(""), "unknown");
        assert_eq!(
            mem_total_from_meminfo("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            24_576_000 * 1024
        );
    }

    #[test]
    fn qemu_versions_are_parsed() {
        assert_eq!(
            parse_qemu_version(
                "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u7)\nCopyright"
            ),
            Some("7.2.19".into())
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 9.0.0\n"),
            Some("9.0.0".into())
        );
        assert_eq!(parse_qemu_version("nonsense"), None);
    }
}
