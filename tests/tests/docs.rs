//! Scenario: the documentation's examples stay true (a doc-snippet check).
//!
//! The pages are `README.md` and every `docs/*.md`. Two kinds of fenced block
//! are checked against the real binaries:
//!
//! - TOML blocks whose info string marks them as whole files: ```` ```toml
//!   bootstrap```` (a bootstrap file, `weft-proxy check --config`) and
//!   ```` ```toml policy```` (a service policy, `weft-proxy check --policy`).
//!   ```` ```toml continued```` appends to the bootstrap block before it on the
//!   same page (the reference shows `[tls]` in a block of its own). Unmarked
//!   TOML blocks are fragments and are not checked. A bootstrap is checked in a
//!   scratch directory holding every policy block of the docs as
//!   `<service>.toml` (a policy file it names that no block shows is a
//!   failure) and, when it has `[tls]`, a test CA and a certificate for its
//!   `[service]` in place of the paths it names.
//! - Command lines in ```` ```sh```` blocks that start with `weftctl`,
//!   `weft-proxy` or `weft-control-plane`: the subcommand path must exist in the
//!   binary's clap (`BIN SUB... --help` exits 0, each step listed under the
//!   parent's `Commands:`), and every `--long-flag` on the line must appear in
//!   that help output. Comments (` # ...`) and what follows a ` | ` are not
//!   part of the command; `\` continues a line; `[--flag]` counts as `--flag`.
//!
//! And every relative link (`[text](path#anchor)`, outside code) of these
//! pages, `ARCHITECTURE.md` and the benches' and examples' READMEs must reach
//! a file, and a heading or `<a id>` in it when it names an anchor.
//!
//! Every failure is reported as `file:line` with what failed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, ensure};
use weft_tests::control_plane::{control_plane_bin, run_blocking, weftctl_bin};
use weft_tests::process::{TempDir, proxy_bin};
use weft_tests::tls::Pki;

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace root")
        .to_owned()
}

/// `README.md` and every `docs/*.md`, as (shown name, text).
fn pages() -> anyhow::Result<Vec<(String, String)>> {
    let root = root();
    let mut names = vec!["README.md".to_owned()];
    let mut docs: Vec<String> = fs::read_dir(root.join("docs"))
        .context("reading docs/")?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    names.extend(docs);
    names
        .into_iter()
        .map(|name| {
            let text =
                fs::read_to_string(root.join(&name)).with_context(|| format!("reading {name}"))?;
            Ok((name, text))
        })
        .collect()
}

/// A fenced code block.
#[derive(Debug, Clone)]
struct Block {
    /// `file:line` of the opening fence.
    at: String,
    /// The words of the info string (`toml`, `policy`, ...).
    info: Vec<String>,
    /// The lines inside the fences, with their 1-based line numbers.
    lines: Vec<(usize, String)>,
}

impl Block {
    fn lang(&self) -> &str {
        self.info.first().map(String::as_str).unwrap_or("")
    }

    fn marked(&self, word: &str) -> bool {
        self.info.iter().skip(1).any(|w| w == word)
    }

    fn text(&self) -> String {
        let mut text = String::new();
        for (_, line) in &self.lines {
            text.push_str(line);
            text.push('\n');
        }
        text
    }
}

/// Every fenced block of a page (fences may be indented, as in lists).
fn blocks(name: &str, text: &str) -> Vec<Block> {
    let mut found = Vec::new();
    let mut open: Option<(usize, Block)> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match open.take() {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    let block = Block {
                        at: format!("{name}:{number}"),
                        info: info.split_whitespace().map(str::to_owned).collect(),
                        lines: Vec::new(),
                    };
                    open = Some((indent, block));
                }
            }
            Some((indent, mut block)) => {
                if trimmed.starts_with("```") {
                    found.push(block);
                } else {
                    let content = line.get(indent..).unwrap_or(trimmed);
                    block.lines.push((number, content.to_owned()));
                    open = Some((indent, block));
                }
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------
// TOML blocks
// ---------------------------------------------------------------------------

/// The string value of `key` in `[section]` (`key = "value"`, one a line).
fn toml_string(text: &str, section: &str, key: &str) -> Option<String> {
    toml_strings(text, section, key).into_iter().next()
}

/// Every string value of `key` in the sections named `section` (`[x]` or `[[x]]`).
fn toml_strings(text: &str, section: &str, key: &str) -> Vec<String> {
    let mut current = "";
    let mut values = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            current = line.trim_start_matches('[').split(']').next().unwrap_or("");
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        if current == section
            && name.trim() == key
            && let Some(value) = value.trim().strip_prefix('"')
        {
            values.extend(value.split('"').next().map(str::to_owned));
        }
    }
    values
}

/// Runs `BIN ARGS...` in `dir`.
fn run(bin: &Path, args: &[&str], dir: &Path) -> anyhow::Result<(bool, String)> {
    let mut command = Command::new(bin);
    command.args(args).current_dir(dir);
    let output = run_blocking(command, args, dir)?;
    Ok((
        output.status.success(),
        format!("{}{}", output.stdout, output.stderr),
    ))
}

#[test]
fn every_whole_toml_block_in_the_docs_passes_check() -> anyhow::Result<()> {
    let proxy = proxy_bin()?;
    let all: Vec<Block> = pages()?
        .iter()
        .flat_map(|(name, text)| blocks(name, text))
        .filter(|b| b.lang() == "toml")
        .collect();

    // Every policy block is checked; a bootstrap gets the first one of each
    // service, under the file name it would give it.
    let mut failures = Vec::new();
    let mut policy_blocks: Vec<(String, &Block)> = Vec::new();
    let mut policies: BTreeMap<String, &Block> = BTreeMap::new();
    let mut bootstraps: Vec<(String, String)> = Vec::new();
    for block in &all {
        if block.marked("policy") {
            let text = block.text();
            match toml_string(&text, "", "service") {
                Some(service) => {
                    let name = format!("{service}.toml");
                    policies.entry(name.clone()).or_insert(block);
                    policy_blocks.push((name, block));
                }
                None => failures.push(format!("{}: a policy block without `service`", block.at)),
            }
        } else if block.marked("bootstrap") {
            bootstraps.push((block.at.clone(), block.text()));
        } else if block.marked("continued") {
            match bootstraps.last_mut() {
                Some((at, text)) if at.split(':').next() == block.at.split(':').next() => {
                    text.push_str(&block.text());
                }
                _ => failures.push(format!(
                    "{}: `continued` with no bootstrap block before it on the page",
                    block.at
                )),
            }
        }
    }
    // The references are marked: finding none means the marking or the parsing broke.
    ensure!(
        !bootstraps.is_empty() && !policies.is_empty(),
        "found {} bootstrap and {} policy blocks in the docs",
        bootstraps.len(),
        policies.len()
    );

    let pki = Pki::new();
    for (name, block) in &policy_blocks {
        let scratch = TempDir::new()?;
        let file = scratch.write(name, &block.text())?;
        let (ok, output) = run(
            &proxy,
            &["check", "--policy", file.to_str().context("UTF-8 path")?],
            scratch.path(),
        )?;
        if !ok || !output.contains("ok: ") {
            failures.push(format!(
                "{}: ```toml policy: weft-proxy check --policy failed (line N of the block \
                 is line N after the fence):\n{output}",
                block.at
            ));
        }
    }
    for (at, text) in &bootstraps {
        let scratch = TempDir::new()?;
        let mut named = toml_strings(text, "service", "policy");
        named.extend(toml_strings(text, "directory.services", "policy"));
        for policy in named {
            match policies.get(&policy) {
                Some(block) => {
                    scratch.write(&policy, &block.text())?;
                }
                None => failures.push(format!(
                    "{at}: the bootstrap names policy file {policy:?}, which no ```toml policy \
                     block shows (`service = ...` decides its file name)"
                )),
            }
        }
        let mut copy = text.clone();
        let service = toml_string(text, "service", "name").unwrap_or_else(|| "caller".to_owned());
        let issued = pki.issue(&service);
        for key in ["ca", "cert", "key"] {
            if let Some(original) = toml_string(text, "tls", key) {
                let contents = match key {
                    "ca" => pki.ca_pem(),
                    "cert" => issued.cert_pem(),
                    _ => issued.key_pem(),
                };
                let written = scratch.write(&format!("{key}.pem"), contents)?;
                copy = copy.replace(
                    &format!("\"{original}\""),
                    &format!("\"{}\"", written.display()),
                );
            }
        }
        let file = scratch.write("weft.toml", &copy)?;
        let (ok, output) = run(
            &proxy,
            &["check", "--config", file.to_str().context("UTF-8 path")?],
            scratch.path(),
        )?;
        if !ok || !output.contains("ok: ") {
            failures.push(format!(
                "{at}: ```toml bootstrap: weft-proxy check --config failed (line N of the \
                 block, `continued` ones appended, is line N after the fence):\n{output}"
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "{} documented file(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Command lines
// ---------------------------------------------------------------------------

/// The binaries whose documented command lines are checked.
const BINARIES: [&str; 3] = ["weftctl", "weft-proxy", "weft-control-plane"];

/// The logical command lines of a `sh` block: `(line number, command)`, with
/// continuations joined, comments cut and only the first command of a pipe
/// or list.
fn command_lines(block: &Block) -> Vec<(usize, String)> {
    let mut commands = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (number, line) in &block.lines {
        let (start, mut joined) = match pending.take() {
            Some((start, text)) => (start, text + " " + line.trim()),
            None => (*number, line.trim().to_owned()),
        };
        if let Some(stripped) = joined.strip_suffix('\\') {
            joined = stripped.trim_end().to_owned();
            pending = Some((start, joined));
            continue;
        }
        commands.push((start, joined));
    }
    commands.extend(pending);
    commands
        .into_iter()
        .map(|(number, line)| {
            let mut command = line.as_str();
            for cut in [" #", "\t#", " | ", " && ", " || ", "; "] {
                if let Some((before, _)) = command.split_once(cut) {
                    command = before;
                }
            }
            (number, command.trim().to_owned())
        })
        .filter(|(_, command)| !command.is_empty() && !command.starts_with('#'))
        .collect()
}

/// The subcommands a clap help output lists under `Commands:`.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .map(|name| name.trim_end_matches(',').to_owned())
        .collect()
}

/// The `--long-flag` a token carries (`--flag`, `--flag=value`, `[--flag]`).
fn long_flag(token: &str) -> Option<String> {
    let token = token.trim_start_matches('[');
    let rest = token.strip_prefix("--")?;
    let name: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    (!name.is_empty()).then(|| format!("--{name}"))
}

/// Whether `help` mentions `flag` as a whole word (`--etcd` is not `--etcd-ca`).
fn mentions(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(at, _)| {
        let next = help[at + flag.len()..].chars().next();
        !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

/// Runs `BIN PATH... --help`, remembering the answers.
struct Helps {
    bins: HashMap<&'static str, PathBuf>,
    seen: HashMap<Vec<String>, (bool, String)>,
    dir: TempDir,
}

impl Helps {
    fn help(&mut self, path: &[String]) -> anyhow::Result<(bool, String)> {
        if let Some(answer) = self.seen.get(path) {
            return Ok(answer.clone());
        }
        let bin = self
            .bins
            .get(path[0].as_str())
            .context("a known binary")?
            .clone();
        let mut args: Vec<&str> = path[1..].iter().map(String::as_str).collect();
        args.push("--help");
        let answer = run(&bin, &args, self.dir.path())?;
        self.seen.insert(path.to_vec(), answer.clone());
        Ok(answer)
    }

    /// What is wrong with a documented command line, if anything.
    fn check(&mut self, command: &str) -> anyhow::Result<Option<String>> {
        let tokens: Vec<&str> = command.split_whitespace().collect();
        let mut path = vec![tokens[0].to_owned()];
        let (ok, mut help) = self.help(&path)?;
        if !ok {
            return Ok(Some(format!("`{} --help` failed:\n{help}", tokens[0])));
        }
        let mut flags = Vec::new();
        let mut after_flag = false;
        for token in &tokens[1..] {
            let is_flag = token.trim_start_matches('[').starts_with('-');
            if let Some(flag) = long_flag(token) {
                flags.push(flag);
            } else if !is_flag {
                let known = subcommands(&help);
                if known.iter().any(|s| s == token) {
                    path.push((*token).to_owned());
                    let (ok, text) = self.help(&path)?;
                    if !ok {
                        return Ok(Some(format!("`{} --help` failed:\n{text}", path.join(" "))));
                    }
                    help = text;
                } else if !known.is_empty() && !after_flag {
                    // Where a subcommand is due, a word that is neither one
                    // nor a flag's value is a subcommand that does not exist.
                    return Ok(Some(format!(
                        "`{token}` is not a subcommand of `{}` (it has: {})",
                        path.join(" "),
                        known.join(", ")
                    )));
                }
            }
            after_flag = is_flag && !token.contains('=');
        }
        let unknown: Vec<String> = flags
            .into_iter()
            .filter(|flag| !mentions(&help, flag))
            .collect();
        if unknown.is_empty() {
            return Ok(None);
        }
        Ok(Some(format!(
            "{} not in `{} --help`",
            unknown.join(", "),
            path.join(" ")
        )))
    }
}

#[test]
fn every_documented_command_line_names_real_subcommands_and_flags() -> anyhow::Result<()> {
    let mut helps = Helps {
        bins: HashMap::from([
            ("weftctl", weftctl_bin()?),
            ("weft-proxy", proxy_bin()?),
            ("weft-control-plane", control_plane_bin()?),
        ]),
        seen: HashMap::new(),
        dir: TempDir::new()?,
    };
    let mut failures = Vec::new();
    let mut checked = HashMap::<&str, usize>::new();
    for (name, text) in pages()? {
        for block in blocks(&name, &text).iter().filter(|b| b.lang() == "sh") {
            for (number, command) in command_lines(block) {
                let Some(bin) = BINARIES
                    .iter()
                    .find(|bin| command.split_whitespace().next() == Some(**bin))
                else {
                    continue;
                };
                *checked.entry(bin).or_default() += 1;
                if let Some(problem) = helps.check(&command)? {
                    failures.push(format!("{name}:{number}: `{command}`: {problem}"));
                }
            }
        }
    }
    // Each binary has documented commands: none found means the parsing broke.
    for bin in BINARIES {
        ensure!(
            checked.get(bin).copied().unwrap_or(0) > 0,
            "no documented `{bin}` command line found ({checked:?})"
        );
    }
    ensure!(
        failures.is_empty(),
        "{} documented command line(s) do not match the binaries:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Links
// ---------------------------------------------------------------------------

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors a Markdown page offers: its headings' and `<a id="...">`s.
fn anchors(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        if let Some(heading) = line.strip_prefix('#') {
            found.push(slug(heading.trim_start_matches('#')));
        }
        let mut rest = line;
        while let Some(at) = rest.find("<a id=\"") {
            rest = &rest[at + 7..];
            if let Some(end) = rest.find('"') {
                found.push(rest[..end].to_owned());
            }
        }
    }
    found
}

/// The `[text](target)` targets of a page outside code, with their line numbers.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut fenced = false;
    for (index, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                found.push((index + 1, rest[..end].to_owned()));
            }
        }
    }
    found
}

#[test]
fn every_relative_link_in_the_docs_reaches_a_file_and_anchor() -> anyhow::Result<()> {
    let root = root();
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut all = pages()?;
    // The other pages that link into these.
    for name in [
        "ARCHITECTURE.md",
        "benches/README.md",
        "examples/deploy/README.md",
        "examples/deploy/kubernetes/README.md",
        "examples/deploy/systemd/README.md",
        "examples/telemetry/README.md",
    ] {
        all.push((name.to_owned(), fs::read_to_string(root.join(name))?));
    }
    for (name, text) in all {
        let dir = Path::new(&name)
            .parent()
            .unwrap_or(Path::new(""))
            .to_owned();
        for (number, target) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, fragment) = target.split_once('#').unwrap_or((&target, ""));
            let file = if path.is_empty() {
                root.join(&name)
            } else {
                root.join(&dir).join(path)
            };
            if !file.exists() {
                failures.push(format!("{name}:{number}: ({target}): no such file"));
                continue;
            }
            if fragment.is_empty() || file.extension().is_none_or(|e| e != "md") {
                continue;
            }
            let page = fs::read_to_string(&file)?;
            if !anchors(&page).iter().any(|a| a == fragment) {
                failures.push(format!(
                    "{name}:{number}: ({target}): no heading or <a id> `{fragment}` there"
                ));
            }
        }
    }
    ensure!(checked > 20, "only {checked} relative links found");
    ensure!(
        failures.is_empty(),
        "{} broken link(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}
