//! Every message variant survives encode → decode unchanged, and no input
//! makes the decoders panic.

use fedsb_protocol::*;
use proptest::prelude::*;

fn shape() -> AdapterShape {
    AdapterShape {
        rank: 3,
        modules: 2,
        head_classes: 2,
        head_hidden: 5,
    }
}

fn adapter(seed: f32) -> AdapterState {
    let mut a = AdapterState::zeros(&shape());
    for (i, t) in a.tensors_mut().enumerate() {
        for (j, x) in t.data.iter_mut().enumerate() {
            *x = seed + i as f32 * 0.5 - j as f32 * 0.125;
        }
    }
    a
}

fn task() -> TaskInfo {
    TaskInfo {
        task_id: "sst2-demo".into(),
        model_id: "sentence-transformers/all-MiniLM-L6-v2".into(),
        model_sha256: "ab".repeat(32),
        module_names: vec!["layer.0.query".into(), "layer.0.key".into()],
        shape: shape(),
        labels: vec!["negative".into(), "positive".into()],
        local_steps: 10,
        batch_size: 32,
        learning_rate: 1e-3,
        head_learning_rate: 2.5e-4,
        max_seq_len: 128,
        total_rounds: 5,
        files: vec![FileRef {
            name: "model.safetensors".into(),
            sha256: "cd".repeat(32),
            size: 90_000_000,
            url: "/files/cdcd".into(),
        }],
        privacy: Some(PrivacyPolicy {
            epsilon: 3.0,
            delta: 1e-5,
            clip_norm: 0.1,
        }),
    }
}

fn all_client_messages() -> Vec<ClientMessage> {
    vec![
        ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: "test ✓ ünïcode".into(),
            participant_key: None,
        },
        ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: "keyed".into(),
            participant_key: Some("0123456789abcdef-_ABCDEFxyz".into()),
        },
        ClientMessage::Update(ClientUpdate {
            round: RoundId(7),
            num_samples: 200,
            train_loss: Some(0.25),
            privacy: Some(PrivacyReport {
                noise_multiplier: 1.1,
                sample_rate: 0.01,
                steps: 100,
                clip_norm: 0.1,
                delta: 1e-5,
                epsilon_spent: 2.5,
            }),
            adapter: adapter(1.0),
        }),
        ClientMessage::Update(ClientUpdate {
            round: RoundId(1),
            num_samples: 1,
            train_loss: None,
            privacy: None,
            adapter: adapter(-3.0),
        }),
        ClientMessage::Leave {
            reason: "tab closed".into(),
        },
        ClientMessage::InitGradient {
            module: 1,
            gradient: Tensor::new(vec![2, 3], vec![1.5, -2.0, 0.0, 1e-30, -7.25, 3.0]).unwrap(),
        },
        ClientMessage::InitDone { num_samples: 256 },
        ClientMessage::CentreLogits {
            logit_sums: Tensor::new(vec![2], vec![-46.75, 41.5]).unwrap(),
            num_samples: 64,
        },
    ]
}

fn all_server_messages() -> Vec<ServerMessage> {
    let mut no_privacy = task();
    no_privacy.privacy = None;
    vec![
        ServerMessage::Welcome {
            protocol_version: PROTOCOL_VERSION,
            participant: ParticipantId(42),
            task: task(),
        },
        ServerMessage::Welcome {
            protocol_version: PROTOCOL_VERSION,
            participant: ParticipantId(0),
            task: no_privacy,
        },
        ServerMessage::GlobalModel {
            round: RoundId(3),
            participants: 50,
            total_samples: 12_345,
            adapter: adapter(0.5),
        },
        ServerMessage::RoundOpen {
            round: RoundId(4),
            deadline_unix_ms: 1_790_000_000_000,
            local_steps: 20,
            learning_rate: 2.5e-3,
        },
        ServerMessage::UpdateAccepted { round: RoundId(4) },
        ServerMessage::Error {
            code: ErrorCode::ShapeMismatch,
            message: "tensor r.1 has shape [2, 2], expected [3, 3]".into(),
        },
        ServerMessage::Error {
            code: ErrorCode::Other(999),
            message: String::new(),
        },
        ServerMessage::TaskFinished {
            rounds_committed: 5,
        },
        ServerMessage::InitRequest {
            init_samples: 256,
            batch_size: 32,
            head_weight: adapter(0.25).head_weight,
            head_bias: Tensor::new(vec![2], vec![0.0, -0.5]).unwrap(),
        },
        ServerMessage::InitAccepted { num_samples: 256 },
        ServerMessage::AdapterReady {
            file: FileRef {
                name: "adapter.safetensors".into(),
                sha256: "ef".repeat(32),
                size: 123_456,
                url: format!("/files/{}", "ef".repeat(32)),
            },
        },
        ServerMessage::CentreRequest {
            init_samples: 64,
            batch_size: 32,
            adapter: adapter(0.75),
        },
        ServerMessage::CentreAccepted { num_samples: 64 },
        ServerMessage::Error {
            code: ErrorCode::NotInitializing,
            message: "the task is not initializing".into(),
        },
        ServerMessage::Error {
            code: ErrorCode::AlreadyConnected,
            message: "this participant is already connected".into(),
        },
    ]
}

#[test]
fn every_client_message_round_trips() {
    for m in all_client_messages() {
        let bytes = m.encode();
        assert_eq!(ClientMessage::decode(&bytes).unwrap(), m);
    }
}

#[test]
fn every_server_message_round_trips() {
    for m in all_server_messages() {
        let bytes = m.encode();
        assert_eq!(ServerMessage::decode(&bytes).unwrap(), m);
    }
}

#[test]
fn every_server_message_kind_is_its_json_type() {
    for m in all_server_messages() {
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["type"], m.kind(), "{json}");
    }
}

#[test]
fn every_error_code_round_trips_through_its_number() {
    for c in 0..=20u16 {
        assert_eq!(ErrorCode::from_code(c).code(), c);
    }
}

#[test]
fn tensors_are_little_endian_f32_after_a_shape_header() {
    let m = ServerMessage::GlobalModel {
        round: RoundId(1),
        participants: 1,
        total_samples: 1,
        adapter: adapter(2.0),
    };
    let bytes = m.encode();
    // magic, kind, round u64, participants u32, total u64, r count u32,
    // then the first tensor: ndim u8 = 2, dims 3 and 3, then 9 f32 values.
    let mut off = 4 + 1 + 8 + 4 + 8;
    assert_eq!(&bytes[..4], &MAGIC);
    assert_eq!(bytes[4], 0x82);
    assert_eq!(
        u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()),
        2
    );
    off += 4;
    assert_eq!(bytes[off], 2);
    assert_eq!(
        u32::from_le_bytes(bytes[off + 1..off + 5].try_into().unwrap()),
        3
    );
    let first = f32::from_le_bytes(bytes[off + 9..off + 13].try_into().unwrap());
    assert_eq!(first, 2.0);
}

#[test]
fn decode_errors_name_the_problem() {
    let err = ClientMessage::decode(b"nope").unwrap_err();
    assert!(matches!(err, DecodeError::BadMagic { .. }), "{err}");

    let mut hello = ClientMessage::Hello {
        protocol_version: 1,
        client: "x".into(),
        participant_key: None,
    }
    .encode();
    hello.push(0);
    let err = ClientMessage::decode(&hello).unwrap_err();
    assert_eq!(err, DecodeError::TrailingBytes { count: 1 });

    let update = all_client_messages()
        .into_iter()
        .find(|m| matches!(m, ClientMessage::Update(_)))
        .unwrap()
        .encode();
    let err = ClientMessage::decode(&update[..update.len() - 3]).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");

    let mut frame = MAGIC.to_vec();
    frame.push(0x7f);
    let err = ClientMessage::decode(&frame).unwrap_err();
    assert_eq!(err.to_string(), "unknown participant message kind 0x7f");

    let big = vec![0u8; MAX_FRAME_BYTES + 1];
    let err = ClientMessage::decode(&big).unwrap_err();
    assert!(matches!(err, DecodeError::FrameTooLarge { .. }));
}

#[test]
fn a_huge_declared_tensor_is_rejected_without_allocating() {
    // An update whose first R claims 2^31 × 2^31 elements in a tiny frame.
    let mut w = MAGIC.to_vec();
    w.push(0x02);
    w.extend_from_slice(&1u64.to_le_bytes()); // round
    w.extend_from_slice(&1u64.to_le_bytes()); // samples
    w.extend_from_slice(&[0, 0]); // no loss, no privacy
    w.extend_from_slice(&1u32.to_le_bytes()); // one R
    w.push(2);
    w.extend_from_slice(&(1u32 << 31).to_le_bytes());
    w.extend_from_slice(&(1u32 << 31).to_le_bytes());
    let err = ClientMessage::decode(&w).unwrap_err();
    assert!(matches!(err, DecodeError::LimitExceeded { .. }), "{err}");
}

#[test]
fn participant_keys_outside_the_rules_do_not_decode() {
    let hello = |key: &str| {
        ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: "x".into(),
            participant_key: Some(key.into()),
        }
        .encode()
    };
    let ok = "a".repeat(MIN_PARTICIPANT_KEY_BYTES);
    assert!(ClientMessage::decode(&hello(&ok)).is_ok());
    let ok = "Z".repeat(MAX_PARTICIPANT_KEY_BYTES);
    assert!(ClientMessage::decode(&hello(&ok)).is_ok());

    let short = "a".repeat(MIN_PARTICIPANT_KEY_BYTES - 1);
    let err = ClientMessage::decode(&hello(&short)).unwrap_err();
    assert!(err.to_string().contains("participant_key length"), "{err}");
    let long = "a".repeat(MAX_PARTICIPANT_KEY_BYTES + 1);
    let err = ClientMessage::decode(&hello(&long)).unwrap_err();
    assert!(
        matches!(err, DecodeError::LimitExceeded { value: 129, .. }),
        "{err}"
    );
    let spaced = format!("{} ", "a".repeat(20));
    let err = ClientMessage::decode(&hello(&spaced)).unwrap_err();
    assert_eq!(
        err,
        DecodeError::InvalidValue {
            field: "hello.participant_key byte (ASCII letters, digits, - and _ only)",
            value: u64::from(b' '),
        }
    );
    assert!(check_participant_key("0123456789abcdef0123456789abcdef").is_ok());
}

#[test]
fn hello_version_can_be_read_from_an_otherwise_undecodable_hello() {
    let mut frame = ClientMessage::Hello {
        protocol_version: 9,
        client: "future".into(),
        participant_key: None,
    }
    .encode();
    frame.extend_from_slice(b"new fields of v9");
    assert!(ClientMessage::decode(&frame).is_err());
    assert_eq!(ClientMessage::peek_hello_version(&frame), Some(9));
}

#[test]
fn validate_reports_count_shape_and_non_finite_values() {
    let s = shape();
    let mut a = adapter(0.0);
    assert!(a.validate(&s).is_ok());
    a.r.pop();
    assert_eq!(
        a.validate(&s).unwrap_err(),
        ContentError::ModuleCount {
            expected: 2,
            found: 1
        }
    );
    let mut a = adapter(0.0);
    a.r[1] = Tensor::zeros(&[3, 2]);
    let e = a.validate(&s).unwrap_err();
    assert_eq!(
        e.to_string(),
        "tensor r.1 has shape [3, 2], expected [3, 3]"
    );
    let mut a = adapter(0.0);
    a.head_bias.data[1] = f32::NAN;
    let e = a.validate(&s).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("tensor head.bias holds a non-finite value"),
        "{e}"
    );
    let mut a = adapter(0.0);
    a.r[0].data[4] = f32::INFINITY;
    assert!(matches!(
        a.validate(&s),
        Err(ContentError::NonFinite { index: 4, .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = ClientMessage::decode(&bytes);
        let _ = ServerMessage::decode(&bytes);
        let _ = ClientMessage::peek_hello_version(&bytes);
    }

    #[test]
    fn random_bytes_after_the_magic_never_panic(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut frame = MAGIC.to_vec();
        frame.push(kind);
        frame.extend_from_slice(&body);
        let _ = ClientMessage::decode(&frame);
        let _ = ServerMessage::decode(&frame);
    }

    #[test]
    fn corrupted_valid_frames_never_panic(which in 0usize..32, pos in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
        let frames: Vec<Vec<u8>> = all_client_messages().iter().map(|m| m.encode())
            .chain(all_server_messages().iter().map(|m| m.encode())).collect();
        let mut f = frames[which % frames.len()].clone();
        let p = pos % f.len();
        f[p] = byte;
        let c = cut % (f.len() + 1);
        let _ = ClientMessage::decode(&f[..c]);
        let _ = ServerMessage::decode(&f[..c]);
        let _ = ClientMessage::decode(&f);
        let _ = ServerMessage::decode(&f);
    }
}

#[test]
fn a_minilm_rank_32_update_has_the_documented_size() {
    // docs/protocol.md, "Size of an update".
    let shape = AdapterShape {
        rank: 32,
        modules: 36,
        head_classes: 2,
        head_hidden: 384,
    };
    let u = ClientMessage::Update(ClientUpdate {
        round: RoundId(1),
        num_samples: 640,
        train_loss: Some(0.3),
        privacy: None,
        adapter: AdapterState::zeros(&shape),
    });
    assert_eq!(shape.num_floats(), 37_634);
    assert_eq!(u.encode().len(), 150_905);
}

/// `AdapterShape::encoded_bytes` is the adapter's exact size in a frame,
/// and `max_frame_bytes` bounds every message that carries one (the
/// aggregator refuses a task whose bound exceeds the frame limit).
#[test]
fn adapter_frame_sizes_are_bounded_by_the_shape() {
    for (rank, modules, head_classes, head_hidden) in [
        (32, 36, 2, 384),
        (1, 1, 1, 1),
        (7, 5, 3, 11),
        (64, 72, 3, 768),
    ] {
        let shape = AdapterShape {
            rank,
            modules,
            head_classes,
            head_hidden,
        };
        let update = |privacy| {
            ClientMessage::Update(ClientUpdate {
                round: RoundId(u64::MAX),
                num_samples: u64::MAX,
                train_loss: Some(0.3),
                privacy,
                adapter: AdapterState::zeros(&shape),
            })
            .encode()
            .len() as u64
        };
        // magic 4, kind 1, round 8, samples 8, loss 1 + 4 (f32), no report 1.
        assert_eq!(update(None), shape.encoded_bytes() + 27, "{shape:?}");
        let report = PrivacyReport {
            noise_multiplier: 1.1,
            sample_rate: 0.01,
            steps: u64::MAX,
            clip_norm: 0.1,
            delta: 1e-5,
            epsilon_spent: 2.5,
        };
        let frames = [
            update(Some(report)),
            ServerMessage::GlobalModel {
                round: RoundId(u64::MAX),
                participants: u32::MAX,
                total_samples: u64::MAX,
                adapter: AdapterState::zeros(&shape),
            }
            .encode()
            .len() as u64,
            ServerMessage::CentreRequest {
                init_samples: u64::MAX,
                batch_size: u32::MAX,
                adapter: AdapterState::zeros(&shape),
            }
            .encode()
            .len() as u64,
        ];
        for bytes in frames {
            assert!(bytes <= shape.max_frame_bytes(), "{shape:?}: {bytes}");
        }
        assert_eq!(shape.frame_limit_error(), None, "{shape:?}");
    }
    // BERT-base (72 modules, hidden 768) fits up to rank 341.
    let bert = |rank| AdapterShape {
        rank,
        modules: 72,
        head_classes: 2,
        head_hidden: 768,
    };
    assert_eq!(bert(341).frame_limit_error(), None);
    let e = bert(342)
        .frame_limit_error()
        .expect("rank 342 is too large");
    assert!(
        e.contains("72 modules of rank 342") && e.contains("33554432-byte frame limit"),
        "{e}"
    );
}

#[test]
fn the_largest_minilm_init_gradient_fits_one_frame() {
    // intermediate.dense / output.dense of all-MiniLM-L6-v2: 1536×384 f32.
    let g = ClientMessage::InitGradient {
        module: 4,
        gradient: Tensor::zeros(&[1536, 384]),
    };
    let bytes = g.encode();
    // magic + kind + module + ndim + 2 dims + values
    assert_eq!(bytes.len(), 4 + 1 + 4 + 1 + 8 + 1536 * 384 * 4);
    assert!(bytes.len() < MAX_FRAME_BYTES);
    assert_eq!(ClientMessage::decode(&bytes).unwrap(), g);
}

#[test]
fn minilm_init_gradients_have_the_documented_size() {
    // all-MiniLM-L6-v2: 6 layers × (query, key, value, attention output:
    // 384×384; intermediate: 1536×384; output: 384×1536), one frame each.
    let shapes = [
        [384, 384],
        [384, 384],
        [384, 384],
        [384, 384],
        [1536, 384],
        [384, 1536],
    ];
    let mut total = 0usize;
    let mut floats = 0usize;
    for layer in 0..6u32 {
        for (i, s) in shapes.iter().enumerate() {
            let g = ClientMessage::InitGradient {
                module: layer * 6 + i as u32,
                gradient: Tensor::zeros(s),
            };
            total += g.encode().len();
            floats += (s[0] * s[1]) as usize;
        }
    }
    total += ClientMessage::InitDone { num_samples: 256 }.encode().len();
    assert_eq!(floats, 10_616_832);
    assert_eq!(total, 42_467_989);
    let request = ServerMessage::InitRequest {
        init_samples: 256,
        batch_size: 32,
        head_weight: Tensor::zeros(&[2, 384]),
        head_bias: Tensor::zeros(&[2]),
    };
    assert_eq!(request.encode().len(), 3_111);
}

#[test]
fn minilm_centring_messages_have_the_documented_size() {
    // all-MiniLM-L6-v2, r = 32, 36 modules, two classes (docs/protocol.md).
    let shape = AdapterShape {
        rank: 32,
        modules: 36,
        head_classes: 2,
        head_hidden: 384,
    };
    let request = ServerMessage::CentreRequest {
        init_samples: 64,
        batch_size: 32,
        adapter: AdapterState::zeros(&shape),
    };
    let global = ServerMessage::GlobalModel {
        round: RoundId(0),
        participants: 0,
        total_samples: 0,
        adapter: AdapterState::zeros(&shape),
    };
    let logits = ClientMessage::CentreLogits {
        logit_sums: Tensor::zeros(&[2]),
        num_samples: 64,
    };
    eprintln!(
        "CentreRequest {} bytes, GlobalModel {} bytes, CentreLogits {} bytes",
        request.encode().len(),
        global.encode().len(),
        logits.encode().len()
    );
    assert_eq!(request.encode().len(), global.encode().len() - 8);
    assert_eq!(request.encode().len(), 150_895);
    // magic + kind + ndim + 1 dim + 2 values + num_samples
    assert_eq!(logits.encode().len(), 4 + 1 + 1 + 4 + 8 + 8);
}
