//! Bad input of every kind is answered with a typed error, counted in
//! `/metrics`, and never changes a round's result: in each test one honest
//! participant submits, the bad input arrives, a second honest participant
//! submits, and the committed mean must be that of the two honest updates.
//! The last tests give the `fedsb` command bad arguments and files: each is
//! answered by the command's own check, naming the option or the line.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use fedsb_e2e::tiny_model::write_tiny_model;
use fedsb_e2e::*;
use fedsb_protocol::*;

struct Honest {
    a: Participant,
    b: Participant,
}

async fn honest_round(
    h: &mut Honest,
    round: RoundId,
    between: impl AsyncFnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let sa = known_state(&TEST_SHAPE, 10 + round.0);
    let sb = known_state(&TEST_SHAPE, 20 + round.0);
    assert_eq!(h.a.wait_round_open().await?, round);
    assert_eq!(h.b.wait_round_open().await?, round);
    let ans = h.a.submit(update(round, 30, sa.clone())).await?;
    assert_eq!(ans, ServerMessage::UpdateAccepted { round });
    between().await?;
    let ans = h.b.submit(update(round, 10, sb.clone())).await?;
    assert_eq!(ans, ServerMessage::UpdateAccepted { round });
    let want = weighted_mean(&[(30.0, &sa), (10.0, &sb)]);
    for p in [&mut h.a, &mut h.b] {
        let global = p.wait_global(round).await?;
        let err = max_rel_error(&global, &want);
        assert!(
            err <= 1e-6,
            "round {round} changed by bad input: relative error {err}"
        );
    }
    Ok(())
}

/// Runs round 1 cleanly, then round 2 with `attack` between the two honest
/// updates; checks the error counter for `code` went up by `expected_count`.
async fn scenario(
    code: ErrorCode,
    expected_count: f64,
    attack: impl AsyncFnOnce(SocketAddr, &mut Participant) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut agg = Aggregator::start(&test_config(2, 2, 2, 60, ""))?;
    let (a, _) = Participant::join(agg.addr, "honest-a").await?;
    let (b, _) = Participant::join(agg.addr, "honest-b").await?;
    let (mut evil, _) = Participant::join(agg.addr, "attacker").await?;
    let mut h = Honest { a, b };
    honest_round(&mut h, RoundId(1), async || Ok(())).await?;
    evil.wait_global(RoundId(1)).await?;
    assert_eq!(evil.wait_round_open().await?, RoundId(2));
    let addr = agg.addr;
    honest_round(&mut h, RoundId(2), async || attack(addr, &mut evil).await).await?;
    let series = format!(
        "fedsb_messages_rejected_total{{reason=\"{}\"}}",
        code.as_str()
    );
    assert_eq!(agg.metric(&series).await?, expected_count, "{series}");
    assert_eq!(agg.metric("fedsb_updates_accepted_total").await?, 4.0);
    assert!(agg.is_running(), "the aggregator must survive bad input");
    let status = agg.json("/api/status").await?;
    assert_eq!(status["state"], "finished");
    Ok(())
}

fn good(round: u64) -> ClientUpdate {
    update(RoundId(round), 5, known_state(&TEST_SHAPE, 99))
}

#[tokio::test]
async fn unknown_protocol_version_is_refused_and_closed() -> anyhow::Result<()> {
    scenario(ErrorCode::VersionMismatch, 1.0, async |addr, _| {
        let mut p = Participant::connect_raw(addr).await?;
        p.send(&ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION + 1,
            client: "from the future".into(),
            participant_key: None,
        })
        .await?;
        let msg = p.expect_error(ErrorCode::VersionMismatch).await?;
        assert!(
            msg.contains(&format!("version {}", PROTOCOL_VERSION + 1)),
            "{msg}"
        );
        assert!(p.closed_within(Duration::from_secs(10)).await);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn undecodable_frames_are_rejected() -> anyhow::Result<()> {
    scenario(ErrorCode::Malformed, 4.0, async |_, evil| {
        evil.send_raw(b"definitely not fedsb".to_vec()).await?;
        let msg = evil.expect_error(ErrorCode::Malformed).await?;
        assert!(msg.contains("magic"), "{msg}");
        let mut truncated = ClientMessage::Update(good(2)).encode();
        truncated.truncate(truncated.len() - 7);
        evil.send_raw(truncated).await?;
        let msg = evil.expect_error(ErrorCode::Malformed).await?;
        assert!(msg.contains("truncated"), "{msg}");
        let mut unknown = MAGIC.to_vec();
        unknown.push(0x55);
        evil.send_raw(unknown).await?;
        let msg = evil.expect_error(ErrorCode::Malformed).await?;
        assert!(msg.contains("kind 0x55"), "{msg}");
        evil.send_text("{\"type\":\"update\"}").await?;
        let msg = evil.expect_error(ErrorCode::Malformed).await?;
        assert!(msg.contains("text frames"), "{msg}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn frames_above_the_limit_are_rejected() -> anyhow::Result<()> {
    scenario(ErrorCode::FrameTooLarge, 2.0, async |addr, evil| {
        let mut frame = ClientMessage::Update(good(2)).encode();
        frame.resize(MAX_FRAME_BYTES + 1, 0);
        evil.send_raw(frame).await?;
        let msg = evil.expect_error(ErrorCode::FrameTooLarge).await?;
        assert!(msg.contains(&MAX_FRAME_BYTES.to_string()), "{msg}");
        // Beyond the 1 MiB the reader lets through: counted too, and the
        // connection closed with 1009 (message too big).
        let mut huge = Participant::connect_raw(addr).await?;
        // The server stops reading mid-frame, so the send may fail.
        let _ = huge.send_raw(vec![0; MAX_FRAME_BYTES + (2 << 20)]).await;
        assert_eq!(huge.close_code_within(STEP_TIMEOUT).await, Some(1009));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn wrong_module_count_or_shape_is_rejected() -> anyhow::Result<()> {
    scenario(ErrorCode::ShapeMismatch, 3.0, async |_, evil| {
        let mut u = good(2);
        u.adapter.r.pop();
        let msg = match evil.submit(u).await? {
            ServerMessage::Error {
                code: ErrorCode::ShapeMismatch,
                message,
            } => message,
            other => anyhow::bail!("{other:?}"),
        };
        assert_eq!(
            msg,
            "expected 12 R matrices (one per adapted module), found 11"
        );
        let mut u = good(2);
        u.adapter.r[3] = Tensor::zeros(&[4, 5]);
        evil.send(&ClientMessage::Update(u)).await?;
        let msg = evil.expect_error(ErrorCode::ShapeMismatch).await?;
        assert_eq!(msg, "tensor r.3 has shape [4, 5], expected [4, 4]");
        let mut u = good(2);
        u.adapter.head_weight = Tensor::zeros(&[3, 8]);
        evil.send(&ClientMessage::Update(u)).await?;
        let msg = evil.expect_error(ErrorCode::ShapeMismatch).await?;
        assert!(msg.contains("head.weight"), "{msg}");
        Ok(())
    })
    .await
}

/// NaN, ±∞, and finite values too large for any honest update (3e38 would
/// overflow the mean and the server's step to ∞): each refused.
#[tokio::test]
async fn nan_or_infinite_values_are_rejected() -> anyhow::Result<()> {
    scenario(ErrorCode::NonFinite, 4.0, async |_, evil| {
        for (t, i, v) in [
            (0usize, 5usize, f32::NAN),
            (11, 0, f32::INFINITY),
            (12, 3, f32::NEG_INFINITY),
            (1, 2, 3e38),
        ] {
            let mut u = good(2);
            let tensor = u.adapter.tensors_mut().nth(t).unwrap();
            tensor.data[i] = v;
            evil.send(&ClientMessage::Update(u)).await?;
            let msg = evil.expect_error(ErrorCode::NonFinite).await?;
            assert!(msg.contains(&format!("at index {i}")), "{msg}");
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn stale_and_future_rounds_are_rejected() -> anyhow::Result<()> {
    scenario(ErrorCode::StaleRound, 1.0, async |_, evil| {
        evil.send(&ClientMessage::Update(good(1))).await?;
        let msg = evil.expect_error(ErrorCode::StaleRound).await?;
        assert!(msg.contains("round 1"), "{msg}");
        evil.send(&ClientMessage::Update(good(3))).await?;
        let msg = evil.expect_error(ErrorCode::FutureRound).await?;
        assert!(msg.contains("round 3"), "{msg}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_second_update_in_one_round_is_rejected() -> anyhow::Result<()> {
    // The attacker's first update is valid and accepted, so this round has
    // three contributors... which would change the mean. Use a dedicated
    // aggregator where the attacker is one of the honest pair instead.
    let agg = Aggregator::start(&test_config(1, 2, 2, 60, ""))?;
    let (mut a, _) = Participant::join(agg.addr, "a").await?;
    let (mut b, _) = Participant::join(agg.addr, "b").await?;
    let round = a.wait_round_open().await?;
    b.wait_round_open().await?;
    let sa = known_state(&TEST_SHAPE, 1);
    let sb = known_state(&TEST_SHAPE, 2);
    assert_eq!(
        a.submit(update(round, 4, sa.clone())).await?,
        ServerMessage::UpdateAccepted { round }
    );
    let again = a
        .submit(update(round, 1000, known_state(&TEST_SHAPE, 3)))
        .await?;
    match again {
        ServerMessage::Error {
            code: ErrorCode::DuplicateUpdate,
            message,
        } => {
            assert!(
                message.contains("already sent an update for round 1"),
                "{message}"
            )
        }
        other => panic!("expected DuplicateUpdate, got {other:?}"),
    }
    assert_eq!(
        b.submit(update(round, 6, sb.clone())).await?,
        ServerMessage::UpdateAccepted { round }
    );
    let global = a.wait_global(round).await?;
    let want = weighted_mean(&[(4.0, &sa), (6.0, &sb)]);
    assert!(max_rel_error(&global, &want) <= 1e-6);
    assert_eq!(
        agg.metric("fedsb_messages_rejected_total{reason=\"duplicate_update\"}")
            .await?,
        1.0
    );
    Ok(())
}

#[tokio::test]
async fn updates_before_the_handshake_are_rejected() -> anyhow::Result<()> {
    scenario(ErrorCode::NotHandshaken, 1.0, async |addr, evil| {
        let mut p = Participant::connect_raw(addr).await?;
        p.send(&ClientMessage::Update(good(2))).await?;
        let msg = p.expect_error(ErrorCode::NotHandshaken).await?;
        assert!(msg.contains("Hello"), "{msg}");
        // A second Hello on an established connection is refused too.
        evil.send(&ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: "again".into(),
            participant_key: None,
        })
        .await?;
        evil.expect_error(ErrorCode::DuplicateHello).await?;
        Ok(())
    })
    .await
}

/// A sample count must be positive and at most what one participant can
/// train on in a round (`local_steps × batch_size`, 20 × 32 in the test
/// config): an overstated count would outweigh the honest updates in the
/// sample-weighted mean.
#[tokio::test]
async fn sample_counts_outside_one_round_of_training_are_rejected() -> anyhow::Result<()> {
    scenario(ErrorCode::InvalidSampleCount, 3.0, async |_, evil| {
        let mut u = good(2);
        u.num_samples = 0;
        evil.send(&ClientMessage::Update(u)).await?;
        let msg = evil.expect_error(ErrorCode::InvalidSampleCount).await?;
        assert!(msg.contains("positive"), "{msg}");
        for n in [20 * 32 + 1, u64::MAX] {
            let mut u = good(2);
            u.num_samples = n;
            evil.send(&ClientMessage::Update(u)).await?;
            let msg = evil.expect_error(ErrorCode::InvalidSampleCount).await?;
            assert!(
                msg.contains(&n.to_string()) && msg.contains("local_steps × batch_size = 640"),
                "{msg}"
            );
        }
        Ok(())
    })
    .await
}

/// Runs `fedsb args`, which must fail with exit status `code` (1: the
/// command's own error; 2: clap's usage error); returns its stderr.
fn fedsb_fails(args: &[&str], code: i32) -> anyhow::Result<String> {
    let out = Command::new(fedsb_bin()).args(args).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    anyhow::ensure!(
        out.status.code() == Some(code),
        "fedsb {} exited with {} instead of {code}; stderr:\n{stderr}",
        args.join(" "),
        out.status
    );
    Ok(stderr)
}

/// `fedsb train` with the options `extra` (split at spaces); its checks of
/// them run before the (absent) model and data files are read.
fn train_with(extra: &str) -> Vec<&str> {
    let args = "train --model absent --train a.tsv --eval a.tsv";
    args.split(' ').chain(extra.split(' ')).collect()
}

/// `--lr -1` is the value -1 for `--lr` (as `--lr=-1` is), not an unknown
/// flag: it reaches the command's own check, which names the option. Every
/// subcommand reads negative numbers so.
#[test]
fn negative_option_values_reach_the_commands_own_checks() -> anyhow::Result<()> {
    let err = fedsb_fails(&train_with("--lr -1"), 1)?;
    assert!(err.contains("--lr -1 must be positive"), "{err}");
    // A flag after a value is still a flag, and a negative exponent a value.
    let err = fedsb_fails(&train_with("--lr 1e-3 --json --dp-epsilon -3 --clip 1"), 1)?;
    assert!(err.contains("--dp-epsilon -3 must be positive"), "{err}");
    let err = fedsb_fails(&train_with("--head-lr -2.5e-4"), 1)?;
    assert!(err.contains("--head-lr -0.00025 must be positive"), "{err}");
    let err = fedsb_fails(&train_with("--init-lr -inf"), 1)?;
    assert!(err.contains("--init-lr -inf must be positive"), "{err}");
    // A flag given as a value is no value.
    let err = fedsb_fails(&train_with("--lr --json"), 2)?;
    assert!(
        err.contains("invalid value '--json' for '--lr <LR>'"),
        "{err}"
    );
    // An unsigned option gets clap's "invalid value", not "unexpected argument".
    let err = fedsb_fails(&train_with("--seed -1"), 2)?;
    assert!(
        err.contains("invalid value '-1' for '--seed <SEED>'"),
        "{err}"
    );

    for sigma in ["--noise-multiplier -1.5", "-s -1.5"] {
        let args = format!("privacy epsilon -q 0.01 -t 100 -d 1e-5 {sigma}");
        let err = fedsb_fails(&args.split(' ').collect::<Vec<_>>(), 1)?;
        assert!(
            err.contains("noise multiplier -1.5 must be a finite number > 0"),
            "{err}"
        );
    }

    // Clap's own errors and exits are unchanged.
    let err = fedsb_fails(&train_with("--no-such-flag"), 2)?;
    assert!(
        err.contains("unexpected argument '--no-such-flag'"),
        "{err}"
    );
    let err = fedsb_fails(&train_with("-7"), 2)?;
    assert!(err.contains("unexpected argument '-7'"), "{err}");
    let out = Command::new(fedsb_bin()).arg("--version").output()?;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("fedsb "));
    Ok(())
}

/// A plain-text `fedsb embed --input` file that is not UTF-8: the error
/// names the file, the line and the byte (before the model is loaded).
#[test]
fn embed_input_that_is_not_utf8_names_the_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("texts.txt");
    std::fs::write(&input, b"first\nsecond\nthi\xffrd\n")?;
    let input = input.display().to_string();
    let model = dir.path().join("absent").display().to_string();
    let err = fedsb_fails(&["embed", "--model", &model, "--input", &input], 1)?;
    assert!(
        err.contains(&format!(
            "{input}:3: not valid UTF-8 (byte 0xff at offset 16)"
        )),
        "{err}"
    );
    Ok(())
}

/// An output path that names one of the command's inputs (the same file by
/// any spelling or link) is refused before anything runs, naming both, and
/// the input is left as it was: one typo must not cost a data set.
#[test]
fn outputs_never_overwrite_the_commands_inputs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let data = "sentence\tlabel\ngood\t1\nbad\t0\n";
    for name in ["train.tsv", "dev.tsv", "init.safetensors", "task.toml"] {
        std::fs::write(d.join(name), data)?;
    }
    std::fs::create_dir(d.join("model"))?;
    std::fs::write(d.join("model/model.safetensors"), data)?;
    let p = |name: &str| d.join(name).display().to_string();
    let (train, dev, init, model) = (
        p("train.tsv"),
        p("dev.tsv"),
        p("init.safetensors"),
        p("model"),
    );
    let weights = p("model/model.safetensors");
    let respelled = p("model/../dev.tsv");
    let csv = p("r.csv");
    let task = p("task.toml");
    let fit = ["--train", &train, "--eval", &dev];
    let sim = ["sim", "--model", &model, "--clients", "2", "--rounds", "1"];
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            [
                &["train", "--model", &model][..],
                &fit,
                &["--output", &train],
            ]
            .concat(),
            format!("--output {train} is the --train file {train}"),
        ),
        (
            [
                &["train", "--model", &model][..],
                &fit,
                &["--output", &respelled],
            ]
            .concat(),
            format!("--output {respelled} is the --eval file {dev}"),
        ),
        (
            [
                &["train", "--model", &model, "--init", &init][..],
                &fit,
                &["--output", &init],
            ]
            .concat(),
            format!("--output {init} is the --init file {init}"),
        ),
        (
            [
                &["train", "--model", &model][..],
                &fit,
                &["--output", &weights],
            ]
            .concat(),
            format!("--output {weights} is a file of the --model {weights}"),
        ),
        (
            vec![
                "init", "--model", &model, "--train", &train, "--labels", "0,1", "--out", &train,
            ],
            format!("--out {train} is the --train file {train}"),
        ),
        (
            [
                &["sim", "--model", &model, "--clients", "2", "--rounds", "1"][..],
                &fit,
                &["--csv", &dev],
            ]
            .concat(),
            format!("--csv {dev} is the --eval file {dev}"),
        ),
        (
            [&sim[..], &fit, &["--csv", &csv, "--plot", &csv]].concat(),
            format!("--plot {csv} is the --csv file {csv}"),
        ),
        (
            vec!["export", "--config", &task, "--out", &task],
            format!("--out {task} is the --config file {task}"),
        ),
    ];
    for (args, expected) in cases {
        let err = fedsb_fails(&args, 1)?;
        assert!(
            err.contains(&expected) && err.contains("would destroy that file"),
            "fedsb {}: {err}",
            args.join(" ")
        );
    }
    // Output directories: never a file, never one holding an earlier run's.
    let shards = [&sim[..], &fit, &["--write-shards", &train]].concat();
    let err = fedsb_fails(&shards, 1)?;
    assert!(
        err.contains(&format!("--write-shards {train} is a file")),
        "{err}"
    );
    let globals = [&sim[..], &fit, &["--write-globals", &model]].concat();
    let err = fedsb_fails(&globals, 1)?;
    assert!(
        err.contains(&format!(
            "--write-globals {model} is not empty (it holds model.safetensors)"
        )),
        "{err}"
    );
    for file in [&train, &dev, &init, &weights, &task] {
        assert_eq!(std::fs::read_to_string(file)?, data, "{file}");
    }
    assert!(!d.join("r.csv").exists());
    Ok(())
}

/// `fedsb init` checks what `fedsb train` checks: η must be a positive
/// number (NaN made the SVD panic; 0 wrote all-zero R₀s), `--labels` needs
/// distinct names, and seed data of one class is refused. Nothing is
/// written.
#[test]
fn init_refuses_what_train_refuses() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    write_tiny_model(&d.join("model"), 1)?;
    std::fs::write(d.join("one.tsv"), "sentence\tlabel\ngood\t1\nfine\t1\n")?;
    std::fs::write(d.join("two.tsv"), "sentence\tlabel\ngood\t1\nbad\t0\n")?;
    let p = |name: &str| d.join(name).display().to_string();
    let (model, out) = (p("model"), p("init.safetensors"));
    let init = |train: &str, extra: &[&str]| -> Vec<String> {
        [
            "init",
            "--model",
            &model,
            "--train",
            &p(train),
            "--out",
            &out,
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    for (args, expected) in [
        (init("two.tsv", &["--lr", "nan"]), "--lr NaN must be positive"),
        (init("two.tsv", &["--lr", "0"]), "--lr 0 must be positive"),
        (init("two.tsv", &["--lr", "-1"]), "--lr -1 must be positive"),
        (
            init("two.tsv", &["--labels", "0,0"]),
            "--labels 0,0: the class \"0\" is named twice (classes 0 and 1)",
        ),
        (
            init("two.tsv", &["--labels", "0,,1"]),
            "--labels 0,,1: class 1 has no name",
        ),
        (
            init("one.tsv", &[]),
            "one.tsv: every example has the label 1; a classifier needs examples of at least two classes",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = fedsb_fails(&args, 1)?;
        assert!(err.contains(expected), "fedsb {}: {err}", args.join(" "));
        assert!(!d.join("init.safetensors").exists());
    }
    Ok(())
}

/// Reads from `stream` until the server closes it (or `limit` passes);
/// returns how long that took, or `None` when it stayed open.
async fn closed_after(
    stream: &mut tokio::net::TcpStream,
    limit: Duration,
) -> Option<std::time::Duration> {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + limit),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A client that opens connections and never finishes a request head (or
/// trickles it a header at a time) is disconnected after
/// `header_read_timeout_secs`; complete requests and a WebSocket that
/// lives longer are not affected.
#[tokio::test]
async fn connections_that_never_finish_a_request_are_closed() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let config = test_config(2, 1, 2, 600, "") + "header_read_timeout_secs = 2\n";
    let agg = Aggregator::start(&config)?;
    let (mut p, _) = Participant::join(agg.addr, "patient").await?;
    let round = p.wait_round_open().await?;

    // Nothing sent at all.
    let mut silent = tokio::net::TcpStream::connect(agg.addr).await?;
    // A request line, then a header every 500 ms, never the blank line.
    let mut trickle = tokio::net::TcpStream::connect(agg.addr).await?;
    trickle
        .write_all(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")
        .await?;
    let dripping = async {
        let started = std::time::Instant::now();
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if trickle
                .write_all(format!("X-Drip-{i}: .\r\n").as_bytes())
                .await
                .is_err()
            {
                // Refused: the server closed the connection.
                return Some(started.elapsed());
            }
        }
        None
    };
    let (silent_closed, dripped, ws_closed) = tokio::join!(
        closed_after(&mut silent, Duration::from_secs(8)),
        dripping,
        // The participant's WebSocket meanwhile: open, answering pings.
        p.closed_within(Duration::from_secs(9)),
    );
    assert!(!ws_closed, "the WebSocket was closed");
    let silent_closed = silent_closed.context("a connection that sent nothing stayed open")?;
    assert!(
        silent_closed >= Duration::from_millis(1500),
        "{silent_closed:?}"
    );
    let dripped = dripped.context("a connection trickling its headers stayed open")?;
    eprintln!("closed after {silent_closed:?} (silent); a trickling one's writes failed after {dripped:?}");
    assert!(dripped < Duration::from_secs(6), "{dripped:?}");

    // A whole request on a fresh connection is answered.
    let mut reader = tokio::net::TcpStream::connect(agg.addr).await?;
    reader
        .write_all(b"GET /api/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut reader, &mut answer).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The WebSocket, open for more than the timeout, still works.
    let u = update(round, 5, known_state(&TEST_SHAPE, 1));
    assert_eq!(p.submit(u).await?, ServerMessage::UpdateAccepted { round });
    Ok(())
}

/// A client that asks for a large file and stops reading it is
/// disconnected once the server's writes have made no progress for
/// `write_timeout_secs`; a client that reads gets the whole file.
#[tokio::test]
async fn a_client_that_stops_reading_a_file_is_disconnected() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SIZE: usize = 48 << 20;
    let www = tempfile::tempdir()?;
    std::fs::write(www.path().join("big.bin"), vec![7u8; SIZE])?;
    let config = test_config(2, 1, 2, 600, "")
        + &format!(
            "write_timeout_secs = 2\nwww_dir = {:?}\n",
            www.path().display().to_string()
        );
    let agg = Aggregator::start(&config)?;
    let request = b"GET /big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let read_all = |mut s: tokio::net::TcpStream| async move {
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    };

    // Reads a little, then nothing for 5 s: the server's writes stall.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stalled = socket.connect(agg.addr).await?;
    stalled.write_all(request).await?;
    let mut head = [0u8; 1024];
    let n = stalled.read(&mut head).await?;
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &head[..n]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    // What the socket buffers held, then the end the server made.
    let got = tokio::time::timeout(Duration::from_secs(20), read_all(stalled))
        .await
        .context("the stalled connection was not closed")?;
    eprintln!("the stalled client got {} of {SIZE} bytes", got + n);
    assert!(
        got + n < SIZE,
        "{} bytes: the server waited for the reader",
        got + n
    );

    // A reader gets it all.
    let mut reader = tokio::net::TcpStream::connect(agg.addr).await?;
    reader.write_all(request).await?;
    let got = tokio::time::timeout(Duration::from_secs(60), read_all(reader)).await?;
    assert!(got > SIZE, "{got} bytes with the head");
    Ok(())
}

/// A WebSocket that answers the server's pings but never says Hello is
/// closed with 1008 after `idle_timeout_secs` (5 s here): it cannot hold a
/// connection without joining. One that joined stays.
#[tokio::test]
async fn a_websocket_that_never_says_hello_is_closed() -> anyhow::Result<()> {
    let agg = Aggregator::start(&test_config(2, 1, 2, 600, ""))?;
    let mut silent = Participant::connect_raw(agg.addr).await?;
    let (mut joined, _) = Participant::join(agg.addr, "joined").await?;
    let (code, joined_closed) = tokio::join!(
        silent.close_code_within(Duration::from_secs(12)),
        joined.closed_within(Duration::from_secs(8)),
    );
    assert_eq!(code, Some(1008));
    assert!(!joined_closed, "the participant that joined was closed");
    Ok(())
}

/// Sends `GET path` on `stream`, keeping the connection open, and returns
/// the response (head and body), or an error after 10 s without one.
async fn get_keeping_open(
    stream: &mut tokio::net::TcpStream,
    path: &str,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let read = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "closed after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .context("no content-length")?
                    .parse()?;
                if got.len() >= end + 4 + length {
                    return Ok(text.into_owned());
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .context("no answer in 10 s")?
}

/// The value of the metric `name` in a `/metrics` response.
fn metric(text: &str, name: &str) -> anyhow::Result<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .with_context(|| format!("no {name} in {text}"))?
        .trim()
        .parse()
        .with_context(|| name.to_string())
}

/// Shells and service managers start processes with a soft limit of 1,024
/// open files; `fedsb serve` raises it to the hard limit, so it is not
/// capped at about a thousand connections. Started here with a soft limit
/// of 128, it answers 300 connections held open at once (a server that
/// kept 128 runs out of file descriptors near the 110th and leaves the
/// rest unanswered), counts them, and says what its limit is.
#[tokio::test]
async fn connections_beyond_a_low_soft_limit_on_open_files_are_served() -> anyhow::Result<()> {
    const HELD: usize = 300;
    let hard = Command::new("sh").args(["-c", "ulimit -Hn"]).output()?;
    let hard = String::from_utf8(hard.stdout)?;
    let hard = hard.trim();
    anyhow::ensure!(
        hard == "unlimited" || hard.parse::<u64>()? >= 512,
        "this test needs a hard limit of at least 512 open files (ulimit -Hn says {hard})"
    );
    let agg = Aggregator::start_with_open_files(&test_config(2, 1, 2, 600, ""), 128)?;
    let (_p, _) = Participant::join(agg.addr, "counted").await?;
    let mut held = Vec::new();
    for i in 0..HELD {
        let mut c = tokio::net::TcpStream::connect(agg.addr).await?;
        let answer = get_keeping_open(&mut c, "/api/status")
            .await
            .with_context(|| format!("connection {} of {HELD}", i + 1))?;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(c);
    }
    let mut probe = tokio::net::TcpStream::connect(agg.addr).await?;
    let metrics = get_keeping_open(&mut probe, "/metrics").await?;
    // The held connections, the WebSocket and the probe.
    assert_eq!(
        metric(&metrics, "fedsb_connections_open")?,
        (HELD + 2) as f64
    );
    let limit = metric(&metrics, "fedsb_open_files_limit")?;
    assert!(limit >= 512.0, "fedsb_open_files_limit {limit}");
    assert_eq!(metric(&metrics, "fedsb_accept_errors_total")?, 0.0);

    drop(held);
    let started = std::time::Instant::now();
    loop {
        let metrics = get_keeping_open(&mut probe, "/metrics").await?;
        let open = metric(&metrics, "fedsb_connections_open")?;
        if open == 2.0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "{open} connections still counted 10 s after all but the WebSocket and the probe closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
