//! Systems and their context: the DAG, combine/split, control-flow checks, declared functions.

use candle_core::{Device, Tensor};
use hyperfunc::prelude::*;
use hyperfunc::{trace_dag, NodeKind};

/// Two branches from the input, joined, then split again.
struct Diamond {
    left: HyperFn,
    right: HyperFn,
    head: HyperFn,
}

impl HyperSystem for Diamond {
    fn hyperfunctions(&self) -> Vec<HyperFn> {
        vec![self.left.clone(), self.right.clone(), self.head.clone()]
    }

    async fn run(&self, cx: &Cx, x: Value) -> Result<Value> {
        let l = cx.call(&self.left, x.clone()).await?;
        let r = cx.call(&self.right, x).await?;
        let both = cx.combine(&[l, r])?;
        let parts = cx.split(&both, &[2, 3])?;
        cx.call(&self.head, parts[1].clone()).await
    }
}

fn diamond() -> Diamond {
    Diamond {
        left: HyperFn::linear("left", 2, 2, Activation::Relu),
        right: HyperFn::linear("right", 2, 3, Activation::Tanh),
        head: HyperFn::linear("head", 3, 1, Activation::Sigmoid),
    }
}

#[tokio::test]
async fn dag_records_calls_dependencies_and_stages() {
    let sys = diamond();
    let theta = Theta::init(&sys, 0, &Device::Cpu).unwrap();
    let dag = trace_dag(&sys, &theta, &crate::common::xor_data())
        .await
        .unwrap();
    let names: Vec<&str> = dag.nodes.iter().map(|n| n.function.as_str()).collect();
    assert_eq!(names, ["left", "right", "combine", "split", "head"]);
    assert_eq!(dag.nodes[0].stage, 1);
    assert_eq!(
        dag.nodes[1].stage, 1,
        "branches of one stage do not depend on each other"
    );
    assert_eq!(dag.nodes[2].inputs, vec![0, 1]);
    assert_eq!(dag.nodes[2].kind, NodeKind::Combine);
    assert_eq!(dag.nodes[4].inputs, vec![3]);
    assert_eq!(dag.stages(), 4);
    // And it trains end to end.
    let r = Es::default()
        .pop_size(8)
        .generations(3)
        .minimize()
        .progress(false)
        .optimize(&sys, &crate::common::xor_data(), &metric::bce())
        .await
        .unwrap();
    assert_eq!(r.history.len(), 3);
}

/// Calls a different function depending on the data: breaks control-flow invariance.
struct Branchy {
    a: HyperFn,
    b: HyperFn,
}

impl HyperSystem for Branchy {
    fn hyperfunctions(&self) -> Vec<HyperFn> {
        vec![self.a.clone(), self.b.clone()]
    }

    async fn run(&self, cx: &Cx, x: Value) -> Result<Value> {
        let first = x
            .as_tensor()?
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap_or_default();
        if first.first().copied().unwrap_or(0.0) > 0.5 {
            cx.call(&self.a, x).await
        } else {
            cx.call(&self.b, x).await
        }
    }
}

#[tokio::test]
async fn control_flow_divergence_between_chunks_is_detected() {
    let sys = Branchy {
        a: HyperFn::linear("a", 2, 1, Activation::Sigmoid),
        b: HyperFn::linear("b", 2, 1, Activation::Sigmoid),
    };
    let x = Tensor::new(&[[0f32, 0.], [1., 1.]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[[0f32], [1.]], &Device::Cpu).unwrap();
    let data = Examples::tensors(x, y).unwrap();
    let theta = Theta::init(&sys, 0, &Device::Cpu).unwrap();
    let pop = Population::center(theta);
    let e = evaluate_population(&sys, &pop, &data, &metric::bce(), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::ControlFlowDivergence { chunk: 1, .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("[b]") && e.to_string().contains("[a]"),
        "{e}"
    );
}

struct Sneaky {
    declared: HyperFn,
    hidden: HyperFn,
}

impl HyperSystem for Sneaky {
    fn hyperfunctions(&self) -> Vec<HyperFn> {
        vec![self.declared.clone()]
    }

    async fn run(&self, cx: &Cx, x: Value) -> Result<Value> {
        let h = cx.call(&self.declared, x).await?;
        cx.call(&self.hidden, h).await
    }
}

#[tokio::test]
async fn calling_an_undeclared_function_is_an_error() {
    let sys = Sneaky {
        declared: HyperFn::linear("declared", 2, 2, Activation::Tanh),
        hidden: HyperFn::linear("hidden", 2, 1, Activation::Sigmoid),
    };
    let theta = Theta::init(&sys, 0, &Device::Cpu).unwrap();
    let e = evaluate(&sys, &theta, &crate::common::xor_data(), &metric::bce())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::UndeclaredFunction { name } if name == "hidden"),
        "{e}"
    );
}

#[tokio::test]
async fn shared_input_stays_shared_until_a_parameter_differs() {
    // Evaluating one θ keeps values shared [N, ..]; a perturbed population makes them [P, N, ..].
    let sys = Chain::new(vec![HyperFn::linear("l", 2, 3, Activation::Identity)]);
    let theta = Theta::init(&sys, 0, &Device::Cpu).unwrap();
    let data = crate::common::xor_data();
    let probe = metric::from_fn(|p, _y| Ok(p.dims().len() as f32));
    let fit = evaluate(&sys, &theta, &data, &probe).await.unwrap();
    assert_eq!(fit, 2.0, "one candidate: predictions [N, 3]");
}
