//! Conversions between the wire types in [`crate::v1`] and the typed values
//! the rest of Weft uses.
//!
//! Wire messages are outside input: everything coming off the wire is checked
//! here, once, and a failure is a [`ConvertError`] naming the field and the
//! bad value. Going the other way cannot fail.
//!
//! - [`v1::Metadata`] and [`weft_config::Metadata`]: an empty `zone` or
//!   `version` on the wire means none; `weight_set = false` means the default
//!   weight (100), because proto3 cannot tell an explicit 0 from unset.
//! - [`v1::Instance`] and [`InstanceRecord`]: the record is what the control
//!   plane stores (as JSON, in etcd) and what a sidecar's directory holds. Its
//!   `Deserialize` runs the same checks as the wire conversion, so a record
//!   read back from the store is as trustworthy as one read off the wire.

use std::fmt;
use std::net::{AddrParseError, SocketAddr};

use serde::{Deserialize, Serialize};
use weft_config::name::InvalidServiceName;
use weft_config::{Metadata, ServiceName, Weight};

use crate::v1;

/// One registered instance of a service, checked: the typed form of
/// [`v1::Instance`].
///
/// Build one from the wire with `InstanceRecord::try_from(&instance)`, turn
/// it back with `v1::Instance::from(&record)`. Stored as JSON by the control
/// plane; deserializing checks `id` and the addresses as the wire conversion
/// does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "UncheckedRecord")]
pub struct InstanceRecord {
    /// The service this instance belongs to.
    pub service: ServiceName,
    /// The instance's id, unique within its service; see
    /// [`InstanceRecord::check_id`] for the rules.
    pub id: String,
    /// The advertised inbound address callers connect to.
    pub address: SocketAddr,
    /// Zone, version, weight and labels.
    pub metadata: Metadata,
    /// The sidecar's admin address, when advertised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_address: Option<SocketAddr>,
    /// Whether the app answers its sidecar's health check; records stored
    /// before health existed read as healthy.
    #[serde(default)]
    pub health: Health,
}

/// An instance's health, as its sidecar's check of its app last found it.
/// Stored as `"healthy"` / `"unhealthy"`; on the wire [`v1::Health`], where
/// unspecified (an older sidecar) means healthy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The app answers: callers may pick the instance.
    #[default]
    Healthy,
    /// The app stopped answering: callers do not pick the instance.
    Unhealthy,
}

impl Health {
    /// True for [`Health::Healthy`].
    pub fn is_healthy(self) -> bool {
        self == Self::Healthy
    }

    /// `"healthy"` or `"unhealthy"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Health> for v1::Health {
    fn from(h: Health) -> Self {
        match h {
            Health::Healthy => Self::Healthy,
            Health::Unhealthy => Self::Unhealthy,
        }
    }
}

impl From<v1::Health> for Health {
    /// Unspecified (never reported) is healthy.
    fn from(h: v1::Health) -> Self {
        match h {
            v1::Health::Unhealthy => Self::Unhealthy,
            v1::Health::Healthy | v1::Health::Unspecified => Self::Healthy,
        }
    }
}

impl Health {
    /// From the wire's `i32`: unknown values (a newer peer) count as healthy,
    /// like unspecified.
    pub fn from_wire(value: i32) -> Self {
        v1::Health::try_from(value).map_or(Self::Healthy, Self::from)
    }
}

impl InstanceRecord {
    /// The longest instance id accepted, in characters.
    pub const MAX_ID_LEN: usize = 128;

    /// Checks an instance id: 1 to [`Self::MAX_ID_LEN`] characters of ASCII
    /// letters, digits, `.`, `_`, `:` and `-` (enough for a host name, a pod
    /// name or `host:port`, and safe in an etcd key and a log line).
    pub fn check_id(id: &str) -> Result<(), ConvertError> {
        let problem = if id.is_empty() || id.len() > Self::MAX_ID_LEN {
            Some(IdProblem::Length)
        } else {
            id.chars()
                .find(|c| !(c.is_ascii_alphanumeric() || "._:-".contains(*c)))
                .map(IdProblem::Character)
        };
        match problem {
            None => Ok(()),
            Some(problem) => Err(ConvertError::Id {
                value: id.to_owned(),
                problem,
            }),
        }
    }

    /// Checks the parts of a record its types do not: the id and the
    /// addresses. Records built by [`TryFrom`] or deserialized are already
    /// checked; this is for records built by hand.
    pub fn check(&self) -> Result<(), ConvertError> {
        Self::check_id(&self.id)?;
        check_addr(AddressField::Address, self.address)?;
        if let Some(admin) = self.admin_address {
            check_addr(AddressField::AdminAddress, admin)?;
        }
        Ok(())
    }
}

/// Why a wire value could not become its typed form. Each variant names the
/// field and carries the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// `instance.service` is not a valid service name (the inner error
    /// carries the name and why).
    #[error("instance.service: {0}")]
    Service(InvalidServiceName),
    /// `instance.id` breaks [`InstanceRecord::check_id`]'s rules.
    #[error("instance.id {value:?}: {problem}")]
    Id {
        /// The id as received.
        value: String,
        /// What is wrong with it.
        problem: IdProblem,
    },
    /// `instance.address` or `instance.admin_address` is not a usable
    /// socket address.
    #[error("{field} {value:?}: {problem}")]
    Address {
        /// Which of the two address fields.
        field: AddressField,
        /// The address as received.
        value: String,
        /// What is wrong with it.
        problem: AddressProblem,
    },
    /// `metadata.weight` is above [`Weight::MAX`].
    #[error("metadata.weight {value}: must be from 0 to {max}", max = Weight::MAX)]
    Weight {
        /// The weight as received.
        value: u32,
    },
    /// `metadata.labels` has a key reserved for a field of its own.
    #[error("metadata.labels {key:?}: the label is reserved; set metadata.{key} instead")]
    ReservedLabel {
        /// The reserved key: `zone`, `version` or `weight`.
        key: String,
    },
}

/// What is wrong with an instance id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdProblem {
    /// Empty, or longer than [`InstanceRecord::MAX_ID_LEN`].
    #[error("must be 1 to {} characters long", InstanceRecord::MAX_ID_LEN)]
    Length,
    /// A character outside the allowed set.
    #[error("character {0:?} is not allowed; use letters, digits, '.', '_', ':' and '-'")]
    Character(char),
}

/// Which address field of an instance an [`ConvertError::Address`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressField {
    /// `instance.address`, the advertised inbound address.
    Address,
    /// `instance.admin_address`, the sidecar's admin address.
    AdminAddress,
}

impl fmt::Display for AddressField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Address => "instance.address",
            Self::AdminAddress => "instance.admin_address",
        })
    }
}

/// What is wrong with an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressProblem {
    /// Not of the form `ip:port` (`[ip6]:port` for IPv6).
    #[error("not an ip:port socket address ({0})")]
    Syntax(AddrParseError),
    /// Port 0, which nobody can connect to.
    #[error("port must not be 0")]
    ZeroPort,
    /// An unspecified IP (`0.0.0.0` or `::`): a listen address, not one
    /// another host can connect to.
    #[error("the unspecified address is not reachable; advertise a concrete IP")]
    Unspecified,
}

/// Checks an address callers (or operators) will connect to.
fn check_addr(field: AddressField, addr: SocketAddr) -> Result<SocketAddr, ConvertError> {
    let problem = if addr.port() == 0 {
        AddressProblem::ZeroPort
    } else if addr.ip().is_unspecified() {
        AddressProblem::Unspecified
    } else {
        return Ok(addr);
    };
    Err(ConvertError::Address {
        field,
        value: addr.to_string(),
        problem,
    })
}

/// Parses and checks an address off the wire.
fn parse_addr(field: AddressField, value: &str) -> Result<SocketAddr, ConvertError> {
    let addr = value.parse().map_err(|e| ConvertError::Address {
        field,
        value: value.to_owned(),
        problem: AddressProblem::Syntax(e),
    })?;
    check_addr(field, addr)
}

/// An empty wire string means none.
fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

impl From<&Metadata> for v1::Metadata {
    fn from(m: &Metadata) -> Self {
        Self {
            zone: m.zone.clone().unwrap_or_default(),
            version: m.version.clone().unwrap_or_default(),
            weight: m.weight.get(),
            labels: m.labels.clone(),
            weight_set: true,
        }
    }
}

impl TryFrom<&v1::Metadata> for Metadata {
    type Error = ConvertError;

    fn try_from(m: &v1::Metadata) -> Result<Self, Self::Error> {
        let weight = if m.weight_set {
            Weight::new(m.weight).ok_or(ConvertError::Weight { value: m.weight })?
        } else {
            Weight::default()
        };
        // The same keys weft-config refuses in a file: `Metadata::get` would
        // answer them from the fields and silently shadow the label.
        if let Some(key) = ["zone", "version", "weight"]
            .into_iter()
            .find(|k| m.labels.contains_key(*k))
        {
            return Err(ConvertError::ReservedLabel {
                key: key.to_owned(),
            });
        }
        Ok(Self {
            zone: non_empty(&m.zone),
            version: non_empty(&m.version),
            weight,
            labels: m.labels.clone(),
        })
    }
}

impl From<&InstanceRecord> for v1::Instance {
    fn from(r: &InstanceRecord) -> Self {
        Self {
            service: r.service.to_string(),
            id: r.id.clone(),
            address: r.address.to_string(),
            metadata: Some(v1::Metadata::from(&r.metadata)),
            admin_address: r.admin_address.map(|a| a.to_string()).unwrap_or_default(),
            health: v1::Health::from(r.health).into(),
        }
    }
}

impl TryFrom<&v1::Instance> for InstanceRecord {
    type Error = ConvertError;

    /// Checks fields in wire order and reports the first bad one. Absent
    /// `metadata` means all defaults; an empty `admin_address` means none.
    fn try_from(i: &v1::Instance) -> Result<Self, Self::Error> {
        let service = i.service.parse().map_err(ConvertError::Service)?;
        InstanceRecord::check_id(&i.id)?;
        let address = parse_addr(AddressField::Address, &i.address)?;
        let metadata = match &i.metadata {
            Some(m) => Metadata::try_from(m)?,
            None => Metadata::default(),
        };
        let admin_address = match i.admin_address.as_str() {
            "" => None,
            a => Some(parse_addr(AddressField::AdminAddress, a)?),
        };
        Ok(Self {
            service,
            id: i.id.clone(),
            address,
            metadata,
            admin_address,
            health: Health::from_wire(i.health),
        })
    }
}

/// The stored JSON shape before [`InstanceRecord::check`]; serde's own types
/// already check the service name, addresses' syntax and metadata.
#[derive(Deserialize)]
struct UncheckedRecord {
    service: ServiceName,
    id: String,
    address: SocketAddr,
    metadata: Metadata,
    #[serde(default)]
    admin_address: Option<SocketAddr>,
    #[serde(default)]
    health: Health,
}

impl TryFrom<UncheckedRecord> for InstanceRecord {
    type Error = ConvertError;

    fn try_from(u: UncheckedRecord) -> Result<Self, Self::Error> {
        let record = Self {
            service: u.service,
            id: u.id,
            address: u.address,
            metadata: u.metadata,
            admin_address: u.admin_address,
            health: u.health,
        };
        record.check()?;
        Ok(record)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn metadata() -> Metadata {
        Metadata {
            zone: Some("eu-west-1a".to_owned()),
            version: Some("v2".to_owned()),
            weight: Weight::new(250).unwrap(),
            labels: BTreeMap::from([("track".to_owned(), "canary".to_owned())]),
        }
    }

    fn record() -> InstanceRecord {
        InstanceRecord {
            service: "orders".parse().unwrap(),
            id: "orders-7f9c:8080".to_owned(),
            address: "10.0.0.7:8080".parse().unwrap(),
            metadata: metadata(),
            admin_address: Some("10.0.0.7:9901".parse().unwrap()),
            health: Health::Healthy,
        }
    }

    fn wire() -> v1::Instance {
        v1::Instance::from(&record())
    }

    fn err(i: &v1::Instance) -> ConvertError {
        InstanceRecord::try_from(i).unwrap_err()
    }

    #[test]
    fn metadata_round_trips() {
        for m in [metadata(), Metadata::default()] {
            let w = v1::Metadata::from(&m);
            assert!(w.weight_set);
            assert_eq!(Metadata::try_from(&w).unwrap(), m);
        }
    }

    #[test]
    fn weight_zero_survives_the_wire() {
        let m = Metadata {
            weight: Weight::new(0).unwrap(),
            ..Metadata::default()
        };
        let back = Metadata::try_from(&v1::Metadata::from(&m)).unwrap();
        assert_eq!(back.weight.get(), 0);
    }

    #[test]
    fn unset_weight_and_empty_strings_are_defaults() {
        let w = v1::Metadata {
            weight: 0,
            weight_set: false,
            ..v1::Metadata::default()
        };
        assert_eq!(Metadata::try_from(&w).unwrap(), Metadata::default());
        assert_eq!(Metadata::default().weight.get(), 100);
    }

    #[test]
    fn weight_out_of_range_is_refused() {
        let w = v1::Metadata {
            weight: 10_001,
            weight_set: true,
            ..v1::Metadata::default()
        };
        let e = Metadata::try_from(&w).unwrap_err();
        assert_eq!(e, ConvertError::Weight { value: 10_001 });
        assert_eq!(
            e.to_string(),
            "metadata.weight 10001: must be from 0 to 10000"
        );
        // Ignored when not set.
        let w = v1::Metadata {
            weight_set: false,
            ..w
        };
        assert_eq!(Metadata::try_from(&w).unwrap().weight.get(), 100);
    }

    #[test]
    fn reserved_labels_are_refused() {
        let mut w = v1::Metadata::from(&metadata());
        w.labels.insert("zone".to_owned(), "x".to_owned());
        let e = Metadata::try_from(&w).unwrap_err();
        assert_eq!(
            e,
            ConvertError::ReservedLabel {
                key: "zone".to_owned()
            }
        );
        assert_eq!(
            e.to_string(),
            "metadata.labels \"zone\": the label is reserved; set metadata.zone instead"
        );
    }

    #[test]
    fn instance_round_trips() {
        let r = record();
        assert_eq!(
            InstanceRecord::try_from(&v1::Instance::from(&r)).unwrap(),
            r
        );

        let r = InstanceRecord {
            address: "[2001:db8::7]:443".parse().unwrap(),
            admin_address: None,
            metadata: Metadata::default(),
            ..record()
        };
        let w = v1::Instance::from(&r);
        assert_eq!(w.address, "[2001:db8::7]:443");
        assert_eq!(w.admin_address, "");
        assert_eq!(InstanceRecord::try_from(&w).unwrap(), r);
    }

    #[test]
    fn absent_metadata_is_default() {
        let w = v1::Instance {
            metadata: None,
            ..wire()
        };
        assert_eq!(
            InstanceRecord::try_from(&w).unwrap().metadata,
            Metadata::default()
        );
    }

    #[test]
    fn invalid_service_is_named() {
        let e = err(&v1::Instance {
            service: "Orders".to_owned(),
            ..wire()
        });
        assert!(matches!(e, ConvertError::Service(_)), "{e:?}");
        let msg = e.to_string();
        assert!(msg.starts_with("instance.service: "), "{msg}");
        assert!(msg.contains("\"Orders\""), "{msg}");

        let e = err(&v1::Instance {
            service: String::new(),
            ..wire()
        });
        assert!(matches!(e, ConvertError::Service(_)), "{e:?}");
    }

    #[test]
    fn invalid_ids_are_named() {
        let id = |id: &str| {
            err(&v1::Instance {
                id: id.to_owned(),
                ..wire()
            })
        };
        assert_eq!(
            id(""),
            ConvertError::Id {
                value: String::new(),
                problem: IdProblem::Length
            }
        );
        let long = "a".repeat(InstanceRecord::MAX_ID_LEN + 1);
        assert_eq!(
            id(&long),
            ConvertError::Id {
                value: long.clone(),
                problem: IdProblem::Length
            }
        );
        let e = id("pod/7");
        assert_eq!(
            e,
            ConvertError::Id {
                value: "pod/7".to_owned(),
                problem: IdProblem::Character('/')
            }
        );
        assert_eq!(
            e.to_string(),
            "instance.id \"pod/7\": character '/' is not allowed; \
             use letters, digits, '.', '_', ':' and '-'"
        );
        assert!(matches!(id("é"), ConvertError::Id { .. }));
        assert!(InstanceRecord::check_id(&"a".repeat(InstanceRecord::MAX_ID_LEN)).is_ok());
        assert!(InstanceRecord::check_id("Host_1.example:8080-a").is_ok());
    }

    #[test]
    fn invalid_addresses_are_named() {
        let address = |a: &str| {
            err(&v1::Instance {
                address: a.to_owned(),
                ..wire()
            })
        };
        let e = address("orders:8080");
        assert!(
            matches!(
                &e,
                ConvertError::Address {
                    field: AddressField::Address,
                    value,
                    problem: AddressProblem::Syntax(_),
                } if value == "orders:8080"
            ),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with("instance.address \"orders:8080\": not an ip:port socket address"),
            "{e}"
        );
        assert!(matches!(
            address(""),
            ConvertError::Address {
                problem: AddressProblem::Syntax(_),
                ..
            }
        ));
        assert_eq!(
            address("10.0.0.7:0"),
            ConvertError::Address {
                field: AddressField::Address,
                value: "10.0.0.7:0".to_owned(),
                problem: AddressProblem::ZeroPort,
            }
        );
        assert_eq!(
            address("0.0.0.0:8080"),
            ConvertError::Address {
                field: AddressField::Address,
                value: "0.0.0.0:8080".to_owned(),
                problem: AddressProblem::Unspecified,
            }
        );
        assert_eq!(
            address("10.0.0.7:0").to_string(),
            "instance.address \"10.0.0.7:0\": port must not be 0"
        );
    }

    #[test]
    fn invalid_admin_address_is_named() {
        let admin = |a: &str| {
            err(&v1::Instance {
                admin_address: a.to_owned(),
                ..wire()
            })
        };
        assert!(matches!(
            admin("localhost:9901"),
            ConvertError::Address {
                field: AddressField::AdminAddress,
                problem: AddressProblem::Syntax(_),
                ..
            }
        ));
        let e = admin("[::1]:0");
        assert_eq!(
            e,
            ConvertError::Address {
                field: AddressField::AdminAddress,
                value: "[::1]:0".to_owned(),
                problem: AddressProblem::ZeroPort,
            }
        );
        assert_eq!(
            e.to_string(),
            "instance.admin_address \"[::1]:0\": port must not be 0"
        );
    }

    #[test]
    fn invalid_metadata_in_an_instance_is_named() {
        let mut w = wire();
        if let Some(m) = w.metadata.as_mut() {
            m.weight = 20_000;
        }
        assert_eq!(err(&w), ConvertError::Weight { value: 20_000 });
    }

    #[test]
    fn json_round_trips() {
        let r = record();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<InstanceRecord>(&json).unwrap(), r);

        let r = InstanceRecord {
            admin_address: None,
            ..record()
        };
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("admin_address").is_none(), "{json}");
        assert_eq!(serde_json::from_value::<InstanceRecord>(json).unwrap(), r);
    }

    #[test]
    fn health_round_trips_and_defaults_to_healthy() {
        let r = InstanceRecord {
            health: Health::Unhealthy,
            ..record()
        };
        let w = v1::Instance::from(&r);
        assert_eq!(w.health(), v1::Health::Unhealthy);
        assert_eq!(InstanceRecord::try_from(&w).unwrap(), r);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["health"], "unhealthy");
        assert_eq!(serde_json::from_value::<InstanceRecord>(json).unwrap(), r);

        // An older sidecar never reports; an older control plane never
        // stored it; a newer peer may send a value this one does not know.
        let old = v1::Instance {
            health: 0,
            ..wire()
        };
        assert_eq!(
            InstanceRecord::try_from(&old).unwrap().health,
            Health::Healthy
        );
        let newer = v1::Instance {
            health: 7,
            ..wire()
        };
        assert_eq!(
            InstanceRecord::try_from(&newer).unwrap().health,
            Health::Healthy
        );
        let mut json = serde_json::to_value(record()).unwrap();
        json.as_object_mut().unwrap().remove("health");
        assert_eq!(
            serde_json::from_value::<InstanceRecord>(json)
                .unwrap()
                .health,
            Health::Healthy
        );
    }

    #[test]
    fn json_is_checked_like_the_wire() {
        let mut json = serde_json::to_value(record()).unwrap();
        json["id"] = "bad id".into();
        let e = serde_json::from_value::<InstanceRecord>(json.clone()).unwrap_err();
        assert!(e.to_string().contains("instance.id \"bad id\""), "{e}");

        json["id"] = "ok".into();
        json["address"] = "10.0.0.7:0".into();
        let e = serde_json::from_value::<InstanceRecord>(json.clone()).unwrap_err();
        assert!(e.to_string().contains("port must not be 0"), "{e}");

        json["address"] = "10.0.0.7:80".into();
        json["service"] = "Bad".into();
        assert!(serde_json::from_value::<InstanceRecord>(json).is_err());
    }

    #[test]
    fn check_catches_hand_built_records() {
        assert!(record().check().is_ok());
        let r = InstanceRecord {
            id: String::new(),
            ..record()
        };
        assert!(matches!(r.check(), Err(ConvertError::Id { .. })));
    }
}
