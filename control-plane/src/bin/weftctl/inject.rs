//! `weftctl inject`: reads Kubernetes YAML from a file or standard input,
//! adds the weft-proxy sidecar with [`weft_control_plane::inject`] and writes
//! the YAML on stdout, one line per workload on stderr. Offline: no control
//! plane, no token. Nothing is written on stdout unless every document is
//! injected.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use weft_config::ServiceName;
use weft_control_plane::inject::{self, DEFAULT_IMAGE, Options, Quantity, Resources};

pub const LONG_ABOUT: &str = "\
Add the weft-proxy sidecar to Kubernetes manifests and print them, e.g.

  weftctl inject -f app.yaml | kubectl apply -f -

Every Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob and Pod (also inside \
a `kind: List`) gets, in its pod (template):
- a `weft-proxy` container: bootstrap file /etc/weft/weft.toml from the ConfigMap \
<service>-weft, mesh certificate (ca.crt, tls.crt, tls.key) from the Secret \
<service>-weft-tls at /etc/weft/tls (not with --no-tls), snapshot cache in an emptyDir at \
/var/lib/weft-proxy, --advertise $(POD_IP):4143, probes on the admin port 4191 (the \
bootstrap file must set [listen] admin = \"0.0.0.0:4191\"), a restricted Pod Security \
context, resource requests and limits. Pods with restartPolicy Never or OnFailure (Jobs, \
CronJobs) get it as a native sidecar (an init container with restartPolicy: Always, \
Kubernetes 1.29+) so that the Job completes;
- HTTP_PROXY=http://127.0.0.1:4140 and NO_PROXY=localhost,127.0.0.1,::1 on each app \
container that sets no HTTP_PROXY;
- terminationGracePeriodSeconds raised to 30 if lower;
- the annotations weft.dev/injected (weftctl's version) and weft.dev/service.

The service name is --service, else the pod template's weft.dev/service annotation, else \
its app.kubernetes.io/name label, else its app label, else the workload's name. Workloads \
(or pod templates) annotated weft.dev/inject: disabled, and documents of other kinds, are \
written unchanged. Injecting an injected manifest again changes nothing.

The YAML is re-written: comments are lost and formatting may change (key order is kept). \
The ConfigMap and the Secret are not created: see the Kubernetes example \
(examples/deploy/kubernetes). With TLS, the bootstrap file's [tls] section names \
/etc/weft/tls/ca.crt, /etc/weft/tls/tls.crt and /etc/weft/tls/tls.key.";

#[derive(Debug, Args)]
pub struct InjectArgs {
    /// The manifests: a YAML file (several `---` documents allowed) or `-`
    /// (standard input, the default).
    #[arg(short = 'f', long = "file", value_name = "FILE", default_value = "-")]
    file: PathBuf,
    /// The service every injected pod registers as (default: each pod's
    /// own, see above).
    #[arg(long)]
    service: Option<ServiceName>,
    /// The sidecar's image.
    #[arg(long, default_value = DEFAULT_IMAGE)]
    image: String,
    /// A plaintext mesh: no certificate Secret.
    #[arg(long)]
    no_tls: bool,
    /// The sidecar's CPU request.
    #[arg(long, default_value = "50m", value_name = "QUANTITY")]
    cpu_request: Quantity,
    /// The sidecar's CPU limit.
    #[arg(long, default_value = "1", value_name = "QUANTITY")]
    cpu_limit: Quantity,
    /// The sidecar's memory request.
    #[arg(long, default_value = "32Mi", value_name = "QUANTITY")]
    memory_request: Quantity,
    /// The sidecar's memory limit.
    #[arg(long, default_value = "64Mi", value_name = "QUANTITY")]
    memory_limit: Quantity,
}

pub fn run(args: InjectArgs) -> anyhow::Result<()> {
    let (name, input) = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
        ("<stdin>".to_owned(), text)
    } else {
        let text = std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?;
        (args.file.display().to_string(), text)
    };
    let options = Options {
        image: args.image,
        service: args.service,
        tls: !args.no_tls,
        resources: Resources {
            cpu_request: args.cpu_request,
            cpu_limit: args.cpu_limit,
            memory_request: args.memory_request,
            memory_limit: args.memory_limit,
        },
        ..Options::default()
    };
    let injected = inject::inject(&input, &options).with_context(|| name.clone())?;
    print!("{}", injected.yaml);
    for workload in &injected.workloads {
        eprintln!("{workload}");
    }
    Ok(())
}
