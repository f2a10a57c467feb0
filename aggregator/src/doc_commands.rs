//! The `fedsb` commands that README.md, BENCHMARKS.md and docs/ show are
//! checked against the command line itself, so that a renamed or removed
//! option cannot leave a command in the documentation that no longer runs:
//! every `--option` written after `fedsb <command>` must be one of that
//! command's options, and every whole command in a code block must parse
//! (placeholders such as `E` or `DIR`, and shell variables, stand for
//! values and are not checked).

use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::CommandFactory;

use crate::{with_negative_numbers, Cli};

/// A piece of code in a Markdown file: an inline span or a command line of a
/// fenced block (backslash continuations joined).
struct Snippet {
    file: PathBuf,
    line: usize,
    text: String,
    fenced: bool,
}

/// Code blocks of these languages hold no shell commands.
const NOT_SHELL: [&str; 6] = ["toml", "json", "text", "rust", "js", "javascript"];

fn snippets(file: &Path, markdown: &str) -> Vec<Snippet> {
    let mut out = Vec::new();
    let mut fence: Option<String> = None;
    let mut pending: Option<(usize, String)> = None;
    // An inline span open at the end of a line continues on the next one.
    let mut span: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        let number = i + 1;
        if let Some(lang) = line.trim_start().strip_prefix("```") {
            fence = match fence {
                None => Some(lang.trim().to_owned()),
                Some(_) => None,
            };
            span = None;
            continue;
        }
        match &fence {
            Some(lang) if NOT_SHELL.contains(&lang.as_str()) => {}
            Some(_) => {
                let (start, mut text) = pending.take().unwrap_or((number, String::new()));
                text.push(' ');
                text.push_str(line.trim());
                match text.strip_suffix('\\') {
                    Some(joined) => pending = Some((start, joined.to_owned())),
                    None => out.push(Snippet {
                        file: file.to_owned(),
                        line: start,
                        text,
                        fenced: true,
                    }),
                }
            }
            None => {
                if line.trim().is_empty() {
                    // A paragraph ends: an unclosed backtick was literal.
                    span = None;
                    continue;
                }
                let mut rest = line;
                while let Some(tick) = rest.find('`') {
                    match span.take() {
                        Some((start, mut text)) => {
                            text.push_str(&rest[..tick]);
                            out.push(Snippet {
                                file: file.to_owned(),
                                line: start,
                                text,
                                fenced: false,
                            });
                        }
                        None => span = Some((number, String::new())),
                    }
                    rest = &rest[tick + 1..];
                }
                if let Some((_, text)) = &mut span {
                    text.push_str(rest);
                    text.push(' ');
                }
            }
        }
    }
    out
}

/// Each `fedsb <command> …` in `text`: its words from `fedsb` to the end of
/// the command (a pipe, `&&`, `;`, a redirection or a comment).
fn commands(text: &str) -> Vec<Vec<String>> {
    let words =
        shlex::split(text).unwrap_or_else(|| text.split_whitespace().map(str::to_owned).collect());
    let names: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    let ends = |w: &String| {
        matches!(w.as_str(), "|" | "||" | "&&" | ";" | "&" | ")")
            || w.starts_with('>')
            || w.starts_with("2>")
    };
    let mut out = Vec::new();
    // In `cargo run … --bin fedsb -- train …`, the `--` is where fedsb's
    // own words begin.
    let mut cargo_run_fedsb = false;
    let mut i = 0;
    while i + 1 < words.len() {
        if ends(&words[i]) {
            cargo_run_fedsb = false;
        } else if words[i] == "cargo" && words[i + 1] == "run" {
            cargo_run_fedsb = words[i..]
                .iter()
                .take_while(|w| !ends(w) && *w != "--")
                .any(|w| w == "fedsb");
        }
        let is_fedsb = words[i] == "fedsb"
            || words[i].ends_with("/fedsb")
            || (cargo_run_fedsb && words[i] == "--");
        if is_fedsb && names.contains(&words[i + 1]) {
            let end = words[i + 1..]
                .iter()
                .position(ends)
                .map_or(words.len(), |p| i + 1 + p);
            let mut command = vec!["fedsb".to_owned()];
            command.extend(words[i + 1..end].iter().cloned());
            out.push(command);
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// The subcommand `words` (from `fedsb` on) runs: `train`, `privacy sigma`.
fn subcommand(root: &clap::Command, words: &[String]) -> Option<(clap::Command, usize)> {
    let mut command = root.find_subcommand(words.get(1)?)?.clone();
    let mut used = 2;
    while command.has_subcommands() {
        match words.get(used).and_then(|w| command.find_subcommand(w)) {
            Some(inner) => {
                command = inner.clone();
                used += 1;
            }
            None => break,
        }
    }
    Some((command, used))
}

/// A documented value that stands for one: `E`, `DIR`, `GPU-NAME`, `$S`.
fn placeholder(value: &str) -> bool {
    value.contains('$')
        || (value.chars().any(|c| c.is_ascii_uppercase())
            && value
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || "_-".contains(c)))
}

/// What is wrong with one documented command, if anything.
fn problems(root: &clap::Command, words: &[String], fenced: bool) -> Vec<String> {
    let Some((command, used)) = subcommand(root, words) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for word in &words[used..] {
        let word = word.trim_start_matches(['[', '(']);
        let Some(option) = word.strip_prefix("--") else {
            continue;
        };
        let name = option
            .split(['=', ']', ')', ',', '|'])
            .next()
            .unwrap_or_default()
            .trim_end_matches(['.', ':', ';']);
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            continue;
        }
        let known = matches!(name, "help" | "version")
            || command.get_arguments().any(|a| a.get_long() == Some(name));
        if !known {
            found.push(format!("`{}` has no option --{name}", command.get_name()));
        }
    }
    // A whole command, not a synopsis with […], <…> or elisions.
    let synopsis = words
        .iter()
        .any(|w| w.contains(['[', '<', '…', '|']) || w.contains("..."));
    if fenced && found.is_empty() && !synopsis {
        if let Err(e) = root.clone().try_get_matches_from(words) {
            let value = match e.get(ContextKind::InvalidValue) {
                Some(ContextValue::String(v)) => Some(v.clone()),
                _ => None,
            };
            let stands_for_a_value = matches!(
                e.kind(),
                ErrorKind::InvalidValue | ErrorKind::ValueValidation
            ) && value.as_deref().is_some_and(placeholder);
            let help = matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion);
            if !stands_for_a_value && !help {
                let message = e.render().to_string();
                found.push(message.lines().next().unwrap_or_default().to_owned());
            }
        }
    }
    found
}

fn documentation() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    if let Ok(entries) = std::fs::read_dir(root.join("docs")) {
        let mut docs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "md"))
            .collect();
        docs.sort();
        files.extend(docs);
    }
    files
}

#[test]
fn documented_commands_use_options_that_exist() {
    let root = with_negative_numbers(Cli::command());
    let mut checked = 0;
    let mut wrong = Vec::new();
    for file in documentation() {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        for snippet in snippets(&file, &text) {
            for words in commands(&snippet.text) {
                checked += 1;
                for problem in problems(&root, &words, snippet.fenced) {
                    wrong.push(format!(
                        "{}:{}: {problem}\n    {}",
                        snippet
                            .file
                            .file_name()
                            .unwrap_or_default()
                            .to_string_lossy(),
                        snippet.line,
                        words.join(" ")
                    ));
                }
            }
        }
    }
    // The README alone shows well over a hundred.
    assert!(checked > 150, "only {checked} documented commands found");
    eprintln!("{checked} documented commands checked");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The checks themselves: each catches what it is for.
#[test]
fn a_wrong_documented_command_is_caught() {
    let root = with_negative_numbers(Cli::command());
    let check = |markdown: &str| -> Vec<String> {
        snippets(Path::new("x.md"), markdown)
            .iter()
            .flat_map(|s| {
                commands(&s.text)
                    .into_iter()
                    .flat_map(|w| problems(&root, &w, s.fenced))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    // An option that does not exist, inline (across a line break) and in a
    // block (across a continuation), and after another tool's pipe.
    assert_eq!(
        check("Run `fedsb train --model M\n--learning-rate 1` now.").len(),
        1
    );
    assert_eq!(
        check("```sh\nfedsb sim --model m --train t \\\n    --eval e --clients 2 --rounds 1 --split iid --nodes 3\n```\n").len(),
        1
    );
    assert!(check("```sh\nfedsb train --help | grep --color x\n```\n").is_empty());
    assert_eq!(
        check("```sh\ncargo run --release --bin fedsb -- embed --model m --txt a\n```\n").len(),
        1
    );
    // A whole command with a missing required option, or a bad value.
    assert_eq!(
        check("```sh\nfedsb train --model m --eval e\n```\n").len(),
        1
    );
    assert_eq!(
        check("```sh\nfedsb privacy epsilon --sample-rate 0.01 --noise-multiplier 1 --steps many --delta 1e-5\n```\n").len(),
        1
    );
    // Placeholders, variables, synopses and inline fragments pass.
    assert!(check("```sh\nfedsb privacy epsilon --sample-rate Q --noise-multiplier S --steps T --delta D\nfedsb train --model m --train t --eval e --seed $S\n```\n").is_empty());
    assert!(
        check("`fedsb join --server URL --data FILE [--name N]` and `fedsb train`'s `--lr`")
            .is_empty()
    );
    assert!(check("```toml\nfedsb sim --nodes 3\n```\n").is_empty());
}
