//! `check`, `apply` and `diff`: policy files against `weft-config` and the
//! control plane.
//!
//! Every file is read and validated before anything is written: one invalid
//! file, two files for one service, or (without `--create`) a file for a
//! service the control plane has never seen, and nothing is applied.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use http::{Method, StatusCode};
use serde_json::json;
use similar::{ChangeTag, TextDiff};
use weft_config::CallerId;

use super::{Api, Stored};
use crate::files::{self, PolicyFile};
use crate::output::Output;

/// The changed lines only, each `  -old` or `  +new`.
fn changed_lines(old: &str, new: &str) -> String {
    let diff = TextDiff::from_lines(old, new);
    let mut out = String::new();
    for change in diff.iter_all_changes() {
        let sign = match change.tag() {
            ChangeTag::Equal => continue,
            ChangeTag::Delete => '-',
            ChangeTag::Insert => '+',
        };
        out.push_str(&format!(
            "  {sign}{}\n",
            change.value().trim_end_matches(['\n', '\r'])
        ));
    }
    out
}

/// Whether the control plane has ever seen `service`: it has live instances
/// or a policy (`stored`, read before).
async fn known(api: &Api, service: &str, stored: Option<&Stored>) -> anyhow::Result<bool> {
    if stored.is_some() {
        return Ok(true);
    }
    match api
        .call(Method::GET, &format!("/v1/services/{service}"), None)
        .await?
    {
        (StatusCode::NOT_FOUND, _) => Ok(false),
        (status, value) if !status.is_success() => Err(api.refused(status, &value)),
        (_, value) => Ok(value["instances"].as_array().is_some_and(|i| !i.is_empty())),
    }
}

pub async fn apply(
    api: &Api,
    args: &[PathBuf],
    create: bool,
    allow_faults: bool,
) -> anyhow::Result<()> {
    let sources = files::expand(args)?;
    let Ok(mut loaded) = files::load_all(sources) else {
        bail!("nothing applied: fix the invalid file(s) above");
    };
    // Faults only with --allow-faults (the control plane checks it too);
    // with it, the text is sent as the control plane will store it, so an
    // unchanged file reads as unchanged.
    for file in &mut loaded {
        let faults = file.policy.fault_routes();
        if allow_faults {
            if !faults.is_empty() {
                file.text = weft_config::permit_faults(&file.text, file.policy.allow_faults);
            }
            continue;
        }
        if let Some(route) = faults.first() {
            bail!(
                "nothing applied: {}: routes.{route}.fault injects faults; pass --allow-faults \
                 to permit fault injection for this policy",
                file.name()
            );
        }
        if file.policy.allow_faults {
            bail!(
                "nothing applied: {}: allow_faults is written by the control plane; pass \
                 --allow-faults to apply a policy with it",
                file.name()
            );
        }
    }
    let query = if allow_faults {
        "?allow_faults=true"
    } else {
        ""
    };
    for (i, file) in loaded.iter().enumerate() {
        if let Some(earlier) = loaded[..i].iter().find(|f| f.service() == file.service()) {
            bail!(
                "nothing applied: {} and {} are both policies for service {}",
                earlier.name(),
                file.name(),
                file.service()
            );
        }
    }
    // What is stored now, and (without --create) whether each service
    // exists, for every file before any is written.
    let mut plan: Vec<(&PolicyFile, Option<Stored>)> = Vec::with_capacity(loaded.len());
    let mut unknown = 0;
    for file in &loaded {
        let stored = api
            .stored_policy(file.service())
            .await
            .with_context(|| format!("applying {}", file.name()))?;
        if !create && !known(api, file.service(), stored.as_ref()).await? {
            eprintln!(
                "error: {}: service {:?} has never registered with the control plane (no \
                 instances, no policy)",
                file.name(),
                file.service()
            );
            unknown += 1;
        }
        plan.push((file, stored));
    }
    if unknown > 0 {
        bail!(
            "nothing applied: check the service name, or pass --create to apply a policy \
             before its service's first instance registers (control plane at {})",
            api.base
        );
    }
    for (file, stored) in plan {
        let service = file.service();
        let path = file.name();
        if stored.as_ref().map(|s| s.text.as_str()) == Some(file.text.as_str()) {
            println!("policy {service} unchanged ({path})");
            continue;
        }
        let value = api
            .ok(
                Method::PUT,
                &format!("/v1/services/{service}/policy{query}"),
                Some(file),
            )
            .await
            .with_context(|| format!("applying {path}"))?;
        let revision = &value["revision"];
        match stored {
            None => println!("policy {service} created from {path} (revision {revision})"),
            Some(old) => {
                println!("policy {service} updated from {path} (revision {revision})");
                print!("{}", changed_lines(&old.text, &file.text));
            }
        }
    }
    Ok(())
}

/// Validate every file offline; with `api` (`--control-plane` given on the
/// command line), also warn about services the control plane has never seen.
pub async fn check(args: &[PathBuf], api: Option<&Api>) -> ExitCode {
    let sources = match files::expand(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut code = ExitCode::SUCCESS;
    let mut valid = Vec::new();
    for source in sources {
        match files::load(source) {
            Ok(file) => {
                println!(
                    "{}: ok (policy for service {})",
                    file.name(),
                    file.service()
                );
                valid.push(file);
            }
            Err(e) => {
                eprintln!("error: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    if let Some(api) = api.filter(|_| !valid.is_empty()) {
        match api.service_names().await {
            Ok(seen) => {
                for file in &valid {
                    warn_unseen(api, file, &seen);
                }
            }
            Err(e) => eprintln!("warning: the service names were not checked: {e:#}"),
        }
    }
    code
}

/// A `warning:` line for the policy's service and each allowed caller the
/// control plane has never seen (a misspelling, most likely).
fn warn_unseen(api: &Api, file: &PolicyFile, seen: &BTreeSet<String>) {
    let service = file.service();
    if !seen.contains(service) {
        eprintln!(
            "warning: {}: service {service:?} has never registered with the control plane at {} \
             (no instances, no policy)",
            file.name(),
            api.base
        );
    }
    let policy = &file.policy;
    let lists = std::iter::once(("inbound.allow".to_owned(), &policy.inbound.allow)).chain(
        policy
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("routes[{i}].allow"), &r.allow)),
    );
    for (key, list) in lists {
        for caller in list.iter().flatten() {
            let name = match caller {
                CallerId::Service(name) => Some(name.clone()),
                CallerId::Spiffe(id) => id.service(),
            };
            if let Some(name) = name.filter(|n| !seen.contains(n.as_str())) {
                eprintln!(
                    "warning: {}: {key}: service {:?} has never registered with the control \
                     plane at {} (no instances, no policy)",
                    file.name(),
                    name.as_str(),
                    api.base
                );
            }
        }
    }
}

/// `diff`: exit 0 when the file matches the stored policy, 1 when it
/// differs. JSON: `{"service", "file", "stored", "revision", "identical",
/// "diff"}`.
pub async fn diff(api: &Api, arg: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let mut sources = files::expand(&[arg.to_owned()])?;
    let source = match (sources.pop(), sources.is_empty()) {
        (Some(source), true) => source,
        _ => bail!(
            "{}: diff compares one policy file, not a directory of several",
            arg.display()
        ),
    };
    let file = files::load(source).map_err(|e| anyhow::anyhow!("{e}"))?;
    let stored = api
        .stored_policy(file.service())
        .await
        .with_context(|| format!("comparing {}", file.name()))?;
    let identical = stored.as_ref().map(|s| s.text.as_str()) == Some(file.text.as_str());
    let name = file.name().to_string();
    let text = if identical {
        String::new()
    } else {
        let label = if stored.is_some() {
            "stored".to_owned()
        } else {
            format!("stored (service {} has no policy)", file.service())
        };
        let old = stored.as_ref().map_or("", |s| s.text.as_str());
        TextDiff::from_lines(old, file.text.as_str())
            .unified_diff()
            .header(&label, &name)
            .to_string()
    };
    if output.structured() {
        print!(
            "{}",
            output.document(&json!({
                "service": file.service(),
                "file": name,
                "stored": stored.is_some(),
                "revision": stored.as_ref().map(|s| s.revision),
                "identical": identical,
                "diff": text,
            }))
        );
    } else {
        print!("{text}");
    }
    Ok(if identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
