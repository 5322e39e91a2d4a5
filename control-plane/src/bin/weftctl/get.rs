//! `weftctl get services | instances SERVICE | policy SERVICE`, as a table
//! (or the policy file) or, with `-o json`, as documents of their own shape:
//! weftctl's, not the admin API's, so scripts keep working if that changes.

use anyhow::bail;
use clap::Subcommand;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use weft_config::ServiceName;

use super::Api;
use crate::output::{self, Output};

#[derive(Debug, Subcommand)]
pub enum Get {
    /// Every known service: live instances, whether it has a policy.
    Services {
        #[command(flatten)]
        output: Output,
    },
    /// A service's live instances.
    Instances {
        service: ServiceName,
        #[command(flatten)]
        output: Output,
    },
    /// A service's policy, exactly as applied; if the control plane refused
    /// the stored one, the policy in force, flagged.
    Policy {
        service: ServiceName,
        #[command(flatten)]
        output: Output,
    },
}

pub async fn run(api: &Api, what: Get) -> anyhow::Result<()> {
    match what {
        Get::Services { output } => services(api, output).await,
        Get::Instances { service, output } => instances(api, service.as_str(), output).await,
        Get::Policy { service, output } => policy(api, service.as_str(), output).await,
    }
}

/// A JSON string field, or `-`.
fn field(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// `{"live": bool, "services": [{"name", "instances", "policy"}]}`.
async fn services(api: &Api, output: Output) -> anyhow::Result<()> {
    let value = api.ok(Method::GET, "/v1/services", None).await?;
    let live = value["live"].as_bool() != Some(false);
    let services: Vec<Value> = value["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            json!({
                "name": s["name"],
                "instances": s["instances"].as_u64().unwrap_or(0),
                "policy": s["policy"].as_bool() == Some(true),
            })
        })
        .collect();
    if output.structured() {
        print!(
            "{}",
            output.document(&json!({ "live": live, "services": services }))
        );
    } else {
        let mut rows = vec![
            ["SERVICE", "INSTANCES", "POLICY"]
                .map(str::to_owned)
                .to_vec(),
        ];
        for s in &services {
            rows.push(vec![
                field(&s["name"]),
                field(&s["instances"]),
                if s["policy"] == true { "yes" } else { "no" }.to_owned(),
            ]);
        }
        print!("{}", output::table(&rows));
    }
    if !live {
        bail!(
            "the control plane at {} is not following its store: this is its last known view",
            api.base
        );
    }
    Ok(())
}

/// `{"service", "instances": [{"id", "address", "health", "zone", "version",
/// "weight", "labels", "admin_address"}]}`; zone, version and admin_address
/// null when unset.
async fn instances(api: &Api, service: &str, output: Output) -> anyhow::Result<()> {
    let value = api
        .ok(Method::GET, &format!("/v1/services/{service}"), None)
        .await?;
    let instances: Vec<Value> = value["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            let m = &i["metadata"];
            json!({
                "id": i["id"],
                "address": i["address"],
                // Records stored before health existed are healthy.
                "health": i["health"].as_str().unwrap_or("healthy"),
                "zone": m["zone"],
                "version": m["version"],
                "weight": m["weight"],
                "labels": m.get("labels").cloned().unwrap_or_else(|| json!({})),
                "admin_address": i["admin_address"],
            })
        })
        .collect();
    if output.structured() {
        print!(
            "{}",
            output.document(&json!({ "service": service, "instances": instances }))
        );
        return Ok(());
    }
    let mut rows = vec![
        [
            "ID", "ADDRESS", "HEALTH", "ZONE", "VERSION", "WEIGHT", "ADMIN",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for i in &instances {
        rows.push(
            [
                "id",
                "address",
                "health",
                "zone",
                "version",
                "weight",
                "admin_address",
            ]
            .map(|k| field(&i[k]))
            .to_vec(),
        );
    }
    print!("{}", output::table(&rows));
    Ok(())
}

/// `get policy`: the stored policy; if the control plane refused it (it was
/// written to the store by other means and fails validation), the policy in
/// force instead, under comment lines that flag the stored one and say why (so
/// the output is still a valid policy file), and a warning on stderr.
///
/// JSON: `{"service", "policy", "revision", "refused", "in_force"}`: the
/// stored text, its store revision, why it was refused (null if it was not)
/// and the policy in force (null if none).
async fn policy(api: &Api, service: &str, output: Output) -> anyhow::Result<()> {
    let (status, value) = api
        .call(Method::GET, &format!("/v1/services/{service}/policy"), None)
        .await?;
    if status == StatusCode::NOT_FOUND && value["policy"].is_null() {
        bail!(
            "service {service:?} has no policy (control plane at {})",
            api.base
        );
    }
    if !status.is_success() {
        return Err(api.refused(status, &value));
    }
    let Some(stored) = value["policy"].as_str() else {
        bail!(
            "the control plane at {} answered without a policy: {value}",
            api.base
        );
    };
    let refused = value["refused"].as_str();
    let in_force = value["in_force"].as_str();
    let revision = value["revision"].as_i64().unwrap_or_default();
    if output.structured() {
        print!(
            "{}",
            output.document(&json!({
                "service": service,
                "policy": stored,
                "revision": revision,
                "refused": refused,
                "in_force": in_force,
            }))
        );
    }
    let Some(reason) = refused else {
        if !output.structured() {
            print!("{stored}");
        }
        return Ok(());
    };
    let Some(in_force) = in_force else {
        bail!(
            "service {service:?} has no policy in force: the one stored (revision {revision}) \
             was refused by the control plane at {}: {reason}",
            api.base
        );
    };
    eprintln!(
        "warning: the policy stored for {service} (revision {revision}) was refused by the \
         control plane ({}); {}",
        reason.lines().next().unwrap_or_default(),
        if output.structured() {
            "in_force is the policy it serves"
        } else {
            "printing the policy in force"
        }
    );
    if output.structured() {
        return Ok(());
    }
    println!(
        "# REFUSED: the policy stored for {service} (revision {revision}) fails validation; \
         the control plane ignores it and serves this one:"
    );
    for line in reason.lines() {
        println!("#   {line}");
    }
    print!("{in_force}");
    Ok(())
}
