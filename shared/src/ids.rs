//! Newtype ids, validated once at the edge so the rest of the code can trust them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a name was refused; the message says which rule it broke and what a valid name looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {rule}")]
pub struct InvalidName {
    pub kind: &'static str,
    pub value: String,
    pub rule: &'static str,
}

/// Checks a DNS-1123 label: 1-63 characters, lowercase letters, digits and '-', starting and
/// ending with a letter or digit (the rule Kubernetes applies to namespaces and most names).
pub fn check_dns1123_label(kind: &'static str, value: &str) -> Result<(), InvalidName> {
    let fail = |rule| {
        Err(InvalidName {
            kind,
            value: value.chars().take(80).collect(),
            rule,
        })
    };
    if value.is_empty() {
        return fail("must not be empty");
    }
    if value.len() > 63 {
        return fail("must be at most 63 characters (DNS-1123 label)");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return fail(
            "may contain only lowercase letters, digits and '-' (DNS-1123 label), e.g. \"east-2\"",
        );
    }
    let first = value.as_bytes()[0];
    let last = value.as_bytes()[value.len() - 1];
    if first == b'-' || last == b'-' {
        return fail("must start and end with a letter or digit (DNS-1123 label)");
    }
    Ok(())
}

/// Checks a DNS-1123 subdomain: at most 253 characters, dot-separated DNS-1123 labels (the rule
/// Kubernetes applies to node names).
pub fn check_dns1123_subdomain(kind: &'static str, value: &str) -> Result<(), InvalidName> {
    if value.len() > 253 {
        return Err(InvalidName {
            kind,
            value: value.chars().take(80).collect(),
            rule: "must be at most 253 characters (DNS-1123 subdomain)",
        });
    }
    for part in value.split('.') {
        check_dns1123_label(kind, part).map_err(|mut e| {
            e.value = value.chars().take(80).collect();
            e.rule = "must be dot-separated lowercase labels of letters, digits and '-' (DNS-1123 subdomain), e.g. \"node-1.example\"";
            e
        })?;
    }
    Ok(())
}

macro_rules! label_newtype {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidName> {
                let value = value.into();
                check_dns1123_label($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(value: String) -> Result<Self, InvalidName> {
                Self::new(value)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidName;
            fn from_str(value: &str) -> Result<Self, InvalidName> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

label_newtype!(
    /// A cluster's name: unique in the fleet, a DNS-1123 label.
    ClusterName,
    "cluster name"
);
label_newtype!(
    /// A namespace inside a cluster, a DNS-1123 label.
    Namespace,
    "namespace"
);
label_newtype!(
    /// A virtual machine's name inside its namespace, a DNS-1123 label (it becomes a hostname).
    VmName,
    "virtual machine name"
);

/// Where a virtual machine lives: cluster, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VmRef {
    pub cluster: ClusterName,
    pub namespace: Namespace,
    pub name: VmName,
}

impl fmt::Display for VmRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.cluster, self.namespace, self.name)
    }
}

/// A migration's id: also the migrationID both sides of a cross-cluster migration share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MigrationId(pub uuid::Uuid);

impl MigrationId {
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }
}

impl Default for MigrationId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_follow_dns1123_labels() {
        assert!(ClusterName::new("east-2").is_ok());
        assert!(ClusterName::new("a").is_ok());
        assert!(ClusterName::new("x".repeat(63)).is_ok());
        for bad in [
            "",
            "East-2",
            "-east",
            "east-",
            "east_2",
            "east.2",
            &"x".repeat(64),
        ] {
            let err = ClusterName::new(bad).unwrap_err();
            assert_eq!(err.kind, "cluster name");
            assert!(
                err.to_string().contains("DNS-1123") || bad.is_empty(),
                "{err}"
            );
        }
    }

    #[test]
    fn names_refuse_bad_values_when_deserialized() {
        let err = serde_json::from_str::<ClusterName>("\"Bad Name\"").unwrap_err();
        assert!(err.to_string().contains("invalid cluster name"), "{err}");
    }
}
