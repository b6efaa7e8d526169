//! Bad input gets a typed error that names what to fix.

use candle_core::{Device, Tensor};
use hyperfunc::prelude::*;

use crate::common::{xor_data, xor_net};

fn es() -> Es {
    Es::default()
        .pop_size(8)
        .generations(2)
        .minimize()
        .progress(false)
}

#[tokio::test]
async fn shape_mismatch_names_the_function_and_the_shapes() {
    let net = xor_net(None);
    let x = Tensor::zeros((4, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::zeros((4, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let data = Examples::tensors(x, y).unwrap();
    let e = es()
        .optimize(&net, &data, &metric::bce())
        .await
        .unwrap_err();
    match &e {
        Error::ShapeMismatch {
            function,
            actual,
            expected,
            ..
        } => {
            assert_eq!(function, "hidden");
            assert_eq!(actual, &vec![4, 3]);
            assert!(expected.contains('2'), "{expected}");
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
    assert!(
        e.to_string().contains("hidden") && e.to_string().contains("[4, 3]"),
        "{e}"
    );

    // A tensor body returning the wrong shape.
    let bad = HyperFn::tensor("squash", ParamSpec::scalar(), |x, _w| x.sum(1));
    let e = es()
        .optimize(&Chain::new(vec![bad]), &xor_data(), &metric::mse())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { function, what, .. } if function == "squash" && what == "output"),
        "{e}"
    );

    // Targets that do not line up with the predictions.
    let y3 = Tensor::zeros((4, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let x2 = Tensor::zeros((4, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = es()
        .optimize(&net, &Examples::tensors(x2, y3).unwrap(), &metric::bce())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { function, .. } if function == "bce"),
        "{e}"
    );

    // θ of the wrong shape.
    let mut theta = Theta::init(&net, 0, &Device::Cpu).unwrap();
    theta.insert(
        "hidden.weight",
        Tensor::zeros((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let e = evaluate(&net, &theta, &xor_data(), &metric::bce())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { function, actual, .. } if function == "hidden.weight" && actual == &vec![3, 3]),
        "{e}"
    );
}

#[tokio::test]
async fn odd_population_with_antithetic_sampling() {
    let e = es()
        .pop_size(7)
        .optimize(&xor_net(None), &xor_data(), &metric::bce())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::OddPopulation {
                pop_size: 7,
                suggest: 8
            }
        ),
        "{e}"
    );
    // Without mirrored sampling an odd size is fine.
    es().pop_size(7)
        .antithetic(false)
        .optimize(&xor_net(None), &xor_data(), &metric::bce())
        .await
        .unwrap();
}

#[test]
fn empty_examples() {
    let x = Tensor::zeros((0, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::zeros((0, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(Examples::tensors(x, y), Err(Error::EmptyExamples)));
    assert!(matches!(
        Examples::json(vec![], vec![]),
        Err(Error::EmptyExamples)
    ));
    assert!(matches!(
        Examples::from_rows(&[], &[], &Device::Cpu),
        Err(Error::EmptyExamples)
    ));
    let e = Examples::from_rows(
        &[vec![1.0], vec![1.0, 2.0]],
        &[vec![0.0], vec![1.0]],
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
}

#[tokio::test]
async fn duplicate_names() {
    let sys = Chain::new(vec![
        HyperFn::linear("layer", 2, 2, Activation::Tanh),
        HyperFn::linear("layer", 2, 1, Activation::Sigmoid),
    ]);
    let e = es()
        .optimize(&sys, &xor_data(), &metric::bce())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::DuplicateName { name } if name.starts_with("layer")),
        "{e}"
    );
    // Distinct function names whose parameter names collide.
    let sys = Chain::new(vec![
        HyperFn::tensor("a.b", ParamSpec::scalar(), |x, _| Ok(x.clone())),
        HyperFn::tensor_multi("a", vec![("b".into(), ParamSpec::scalar())], |x, _| {
            Ok(x.clone())
        }),
    ]);
    let e = Theta::init(&sys, 0, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&e, Error::DuplicateName { name } if name == "a.b"),
        "{e}"
    );
}

#[tokio::test]
async fn sigma_must_be_positive_and_other_settings_are_checked() {
    for s in [0.0, -0.1, f64::NAN] {
        let e = es()
            .sigma(s)
            .optimize(&xor_net(None), &xor_data(), &metric::bce())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidSigma { .. }), "{e}");
    }
    assert!(
        matches!(es().lr(0.0).validate(), Err(Error::InvalidConfig { field, .. }) if field == "lr")
    );
    assert!(matches!(
        es().max_batch_size(0).validate(),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        es().sgd(1.5).validate(),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        es().shaping(Shaping::CenteredRanks)
            .update(Update::Compat)
            .validate(),
        Err(Error::InvalidConfig { .. })
    ));
    let e = ParamSpec::scalar().bounded(0.0, 1.0).constant(2.0);
    let sys = Chain::new(vec![HyperFn::tensor("t", e, |x, _| Ok(x.clone()))]);
    assert!(
        matches!(Theta::init(&sys, 0, &Device::Cpu), Err(Error::InvalidConfig { field, .. }) if field == "t")
    );
}

#[tokio::test]
async fn wrong_value_kind_is_reported() {
    let sys = Chain::new(vec![HyperFn::linear("l", 1, 1, Activation::Identity)]);
    let data = Examples::json(vec![serde_json::json!("text")], vec![serde_json::json!(1)]).unwrap();
    let e = evaluate(
        &sys,
        &Theta::init(&sys, 0, &Device::Cpu).unwrap(),
        &data,
        &metric::mse(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, Error::WrongValueKind { function, .. } if function == "l"),
        "{e}"
    );
}
