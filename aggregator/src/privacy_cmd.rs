//! `fedsb privacy ...`: differential-privacy accounting from the command line,
//! on top of the `fedsb-privacy` crate.
//!
//! ```text
//! fedsb privacy epsilon --sample-rate 0.04 --noise-multiplier 1.5 --steps 2250 --delta 1e-5
//! fedsb privacy sigma --epsilon 3 --sample-rate 0.01 --steps 10000 --delta 1e-5 --accountant rdp
//! fedsb privacy delta --epsilon 5 --sample-rate 0.04 --noise-multiplier 1.5 --steps 2250 --json
//! ```
//!
//! Plain output is the bare number (for scripts); `--json` prints one JSON
//! object on one line with the inputs echoed.

use anyhow::Context;
use fedsb_privacy::{
    calibrate_noise_multiplier_within, delta_spent, epsilon_spent, AccountantKind,
    CalibrationTarget, SigmaSearch, TrainingSegment,
};

/// Privacy accounting subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PrivacyCommand {
    /// Print the epsilon spent by `steps` DP-SGD steps at (q, sigma), for a delta.
    Epsilon(EpsilonArgs),
    /// Print the smallest noise multiplier sigma that keeps `steps` DP-SGD steps
    /// at sample rate q within (epsilon, delta).
    Sigma(SigmaArgs),
    /// Print the delta of `steps` DP-SGD steps at (q, sigma), for an epsilon.
    Delta(DeltaArgs),
}

/// Which accountant to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccountantArg {
    /// Renyi DP (orders 1.1..10.9 and 12..63, Balle et al. 2020 conversion):
    /// fast, looser.
    Rdp,
    /// Privacy loss distribution (connect-the-dots, spacing 1e-4, FFT):
    /// tighter (smaller epsilon, less noise), still an upper bound; about a
    /// tenth of a second for 10,000 steps.
    Pld,
}

impl From<AccountantArg> for AccountantKind {
    fn from(value: AccountantArg) -> Self {
        match value {
            AccountantArg::Rdp => AccountantKind::Rdp,
            AccountantArg::Pld => AccountantKind::Pld,
        }
    }
}

/// Options every subcommand shares.
#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// Poisson sampling rate q in (0, 1]: expected batch size / local dataset size.
    #[arg(long, short = 'q')]
    sample_rate: f64,
    /// Number of DP-SGD steps.
    #[arg(long, short = 't')]
    steps: u64,
    /// Accountant. PLD is the default because it is tighter, so the same
    /// budget buys more steps or less noise; both are add/remove-one DP
    /// bounds matching Google's dp-accounting.
    #[arg(long, value_enum, default_value_t = AccountantArg::Pld)]
    accountant: AccountantArg,
    /// Print one JSON object on one line instead of the bare number.
    #[arg(long)]
    json: bool,
}

/// `fedsb privacy epsilon`.
#[derive(Debug, clap::Args)]
pub struct EpsilonArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Noise multiplier sigma: noise standard deviation / clipping norm.
    #[arg(long, short = 's')]
    noise_multiplier: f64,
    /// Target delta in (0, 1), e.g. 1e-5 (below 1 / dataset size).
    #[arg(long, short = 'd')]
    delta: f64,
}

/// `fedsb privacy sigma`.
#[derive(Debug, clap::Args)]
pub struct SigmaArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Target epsilon (> 0).
    #[arg(long, short = 'e')]
    epsilon: f64,
    /// Target delta in (0, 1).
    #[arg(long, short = 'd')]
    delta: f64,
    /// Smallest sigma searched.
    #[arg(long, default_value_t = SigmaSearch::default().min)]
    sigma_min: f64,
    /// Largest sigma searched; if it still misses the target the command fails.
    #[arg(long, default_value_t = SigmaSearch::default().max)]
    sigma_max: f64,
}

/// `fedsb privacy delta`.
#[derive(Debug, clap::Args)]
pub struct DeltaArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Noise multiplier sigma.
    #[arg(long, short = 's')]
    noise_multiplier: f64,
    /// Epsilon (>= 0) to report delta at.
    #[arg(long, short = 'e')]
    epsilon: f64,
}

/// Runs a privacy subcommand.
pub fn run(cmd: PrivacyCommand) -> anyhow::Result<()> {
    println!("{}", render(&cmd)?);
    Ok(())
}

/// The line `run` prints.
fn render(cmd: &PrivacyCommand) -> anyhow::Result<String> {
    match cmd {
        PrivacyCommand::Epsilon(args) => {
            let c = &args.common;
            let kind = AccountantKind::from(c.accountant);
            let run = [TrainingSegment::new(
                c.sample_rate,
                args.noise_multiplier,
                c.steps,
            )?];
            let epsilon = epsilon_spent(kind, &run, args.delta)
                .with_context(|| format!("computing epsilon with the {kind} accountant"))?;
            Ok(if c.json {
                format!(
                    "{{\"accountant\":\"{kind}\",\"sample_rate\":{},\"noise_multiplier\":{},\
                     \"steps\":{},\"delta\":{},\"epsilon\":{}}}",
                    json_number(c.sample_rate),
                    json_number(args.noise_multiplier),
                    c.steps,
                    json_number(args.delta),
                    json_number(epsilon),
                )
            } else {
                plain_number(epsilon)
            })
        }
        PrivacyCommand::Sigma(args) => {
            let c = &args.common;
            let kind = AccountantKind::from(c.accountant);
            let target = CalibrationTarget {
                epsilon: args.epsilon,
                delta: args.delta,
                sample_rate: c.sample_rate,
                steps: c.steps,
            };
            let search = SigmaSearch {
                min: args.sigma_min,
                max: args.sigma_max,
                ..SigmaSearch::default()
            };
            let sigma = calibrate_noise_multiplier_within(&target, kind, &search)
                .with_context(|| format!("calibrating sigma with the {kind} accountant"))?;
            let achieved = epsilon_spent(
                kind,
                &[TrainingSegment::new(c.sample_rate, sigma, c.steps)?],
                args.delta,
            )?;
            if let Some(note) = floor_note(sigma, achieved, args.epsilon, args.sigma_min, kind) {
                eprintln!("{note}");
            }
            Ok(if c.json {
                format!(
                    "{{\"accountant\":\"{kind}\",\"sample_rate\":{},\"steps\":{},\"delta\":{},\
                     \"target_epsilon\":{},\"noise_multiplier\":{},\"epsilon\":{}}}",
                    json_number(c.sample_rate),
                    c.steps,
                    json_number(args.delta),
                    json_number(args.epsilon),
                    json_number(sigma),
                    json_number(achieved),
                )
            } else {
                plain_number(sigma)
            })
        }
        PrivacyCommand::Delta(args) => {
            let c = &args.common;
            let kind = AccountantKind::from(c.accountant);
            let run = [TrainingSegment::new(
                c.sample_rate,
                args.noise_multiplier,
                c.steps,
            )?];
            let delta = delta_spent(kind, &run, args.epsilon)
                .with_context(|| format!("computing delta with the {kind} accountant"))?;
            Ok(if c.json {
                format!(
                    "{{\"accountant\":\"{kind}\",\"sample_rate\":{},\"noise_multiplier\":{},\
                     \"steps\":{},\"epsilon\":{},\"delta\":{}}}",
                    json_number(c.sample_rate),
                    json_number(args.noise_multiplier),
                    c.steps,
                    json_number(args.epsilon),
                    json_number(delta),
                )
            } else {
                format!("{delta:e}")
            })
        }
    }
}

/// Six decimals, or `inf` when no finite bound exists.
/// The search answers from above: a σ that spends well below the target
/// ε is where the search stopped (its floor), and a smaller σ may meet the
/// target too; that is said, since σ is usually read as the smallest.
fn floor_note(
    sigma: f64,
    achieved: f64,
    target: f64,
    sigma_min: f64,
    kind: AccountantKind,
) -> Option<String> {
    (achieved < 0.99 * target).then(|| {
        format!(
            "note: σ = {} spends only ε = {} of the target {target}: either the {kind} \
             accountant's ε jumps just below this σ (the RDP bound drops to 0 where its KL \
             form applies) or the search reached its lowest σ (--sigma-min {sigma_min}, or the \
             smallest σ the accountant can evaluate), so a smaller σ may meet the target too",
            plain_number(sigma),
            plain_number(achieved),
        )
    })
}

fn plain_number(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.6}")
    } else {
        "inf".to_owned()
    }
}

/// A JSON number (shortest round-trip form), or `null` for ±∞/NaN, which
/// JSON cannot represent.
fn json_number(x: f64) -> String {
    if x.is_finite() {
        // Rust's `{:?}` for f64 is the shortest representation that round
        // trips, in a syntax JSON accepts (e.g. `1e-5`, `0.04`, `2250.0`).
        format!("{x:?}")
    } else {
        "null".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(subcommand)]
        cmd: PrivacyCommand,
    }

    fn output(args: &str) -> anyhow::Result<String> {
        let argv = std::iter::once("privacy").chain(args.split_whitespace());
        render(&Harness::try_parse_from(argv)?.cmd)
    }

    #[test]
    fn a_sigma_at_the_search_floor_is_said_to_be_one() {
        assert!(floor_note(1.2, 2.995, 3.0, 0.1, AccountantKind::Pld).is_none());
        let note = floor_note(0.1, 0.5, 3.0, 0.1, AccountantKind::Rdp).unwrap();
        assert!(
            note.contains("a smaller σ may meet the target too"),
            "{note}"
        );
    }

    #[test]
    fn epsilon_prints_the_reference_values() {
        let base = "epsilon --sample-rate 0.04 --noise-multiplier 1.5 --steps 2250 --delta 1e-5";
        assert_eq!(
            output(&format!("{base} --accountant rdp")).unwrap(),
            "7.329335"
        );
        assert_eq!(output(base).unwrap(), "6.768787", "PLD is the default");
        let json = output(&format!("{base} --json")).unwrap();
        let want = "{\"accountant\":\"pld\",\"sample_rate\":0.04,\"noise_multiplier\":1.5,\
                    \"steps\":2250,\"delta\":1e-5,\"epsilon\":6.7687873";
        assert!(json.starts_with(want) && json.ends_with('}'), "got {json}");
    }

    #[test]
    fn sigma_round_trips() {
        let sigma: f64 = output(
            "sigma --epsilon 3 --sample-rate 0.01 --steps 10000 --delta 1e-5 --accountant rdp",
        )
        .unwrap()
        .parse()
        .unwrap();
        assert!((sigma - 1.661856).abs() < 1e-5, "{sigma}");
        let json = output("sigma -e 3 -q 0.01 -t 10000 -d 1e-5 --accountant rdp --json").unwrap();
        assert!(
            json.starts_with("{\"accountant\":\"rdp\",") && json.ends_with('}'),
            "{json}"
        );
        assert!(json.contains("\"target_epsilon\":3.0"), "{json}");
    }

    #[test]
    fn delta_prints_scientific() {
        let out = output("delta --epsilon 5 --sample-rate 0.04 --noise-multiplier 1.5 --steps 2250 --accountant rdp").unwrap();
        assert!(out.starts_with("3.3007131"), "{out}");
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let err = output("epsilon -q 1.5 -s 1 -t 10 -d 1e-5").unwrap_err();
        assert!(
            err.to_string()
                .contains("sample rate 1.5 is outside (0, 1]"),
            "{err}"
        );
        let err = output("epsilon -q 0.1 -s 1 -t 10 -d 0").unwrap_err();
        assert!(
            format!("{err:#}").contains("delta 0 must be in (0, 1)"),
            "{err:#}"
        );
        let err = output("sigma -e 0.001 -q 1 -t 1000 -d 1e-5 --sigma-max 5 --accountant rdp")
            .unwrap_err();
        assert!(format!("{err:#}").contains("unreachable"), "{err:#}");
        assert!(output("epsilon -q 0.1 -s 1 -t 10 -d 1e-5 --accountant foo").is_err());
    }
}
