use super::*;
use serde_json::json;

fn parse(value: Value) -> Result<Deployment, ModelError> {
    let params = json!({"greeting": "hi"}).as_object().unwrap().clone();
    Deployment::parse(Path::new("d.json"), &value.to_string(), &params)
}

fn local() -> Value {
    json!({"local": {"builtin": "local"}})
}

#[test]
fn groups_refs_params_and_caps_are_read() {
    let d = parse(json!({
        "providers": local(),
        "resources": {
            "hello": {"provider": "local", "type": "file", "inputs": {"path": "x", "content": {"$param": "greeting"}}},
            "web": {"resources": {
                "db": {"provider": "local", "type": "exec", "inputs": {"command": "cat", "stdin": {"$ref": "hello#content"}, "h": {"$cap": "hello#handle"}}}
            }}
        }
    }))
    .unwrap();
    assert_eq!(
        d.resources["hello"].inputs.get("content"),
        Some(json!("hi"))
    );
    let db = &d.resources["web.db"];
    assert_eq!(db.refs[0].address, "hello");
    assert_eq!(db.refs[0].output, "content");
    assert_eq!(db.capabilities[0].input, "h");
    assert_eq!(db.inputs.keys(), vec!["command", "stdin"]);
    assert_eq!(
        db.place_of(&db.refs[0]),
        "resources.web.db.inputs.stdin",
        "the place of a reference is found again for messages"
    );
    assert_eq!(db.dependencies(), vec!["hello".to_string()]);
}

#[test]
fn a_large_group_read_in_halves_is_the_same_deployment() {
    let n = PARALLEL_FROM + 100;
    let resources = |bad: &[usize]| {
        let mut map = Map::new();
        for i in 0..n {
            let inputs = if bad.contains(&i) {
                json!(5)
            } else if i == 0 {
                json!({"value": 0})
            } else {
                json!({"value": {"$ref": format!("r{}#value", i - 1)}})
            };
            map.insert(
                format!("r{i}"),
                json!({"provider": "local", "type": "memo", "inputs": inputs}),
            );
        }
        json!({"providers": local(), "resources": map})
    };
    let d = parse(resources(&[])).unwrap();
    assert_eq!(d.resources.len(), n);
    assert_eq!(
        d.resources[&format!("r{}", n - 1)].dependencies(),
        vec![format!("r{}", n - 2)],
        "a reference across the halves"
    );
    // The first mistake in the file is the one reported, whichever half finds it first.
    let e = parse(resources(&[10, n - 1])).unwrap_err();
    assert_eq!(e.place, "resources.r10.inputs");
    let e = parse(resources(&[n - 1])).unwrap_err();
    assert_eq!(e.place, format!("resources.r{}.inputs", n - 1));
}

#[test]
fn a_marker_written_with_an_escaped_dollar_is_still_a_marker() {
    let text = r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
        "hello": {"provider": "local", "type": "memo", "inputs": {"value": 1}},
        "user": {"provider": "local", "type": "memo", "inputs": {"value": {"\u0024ref": "hello#value"}}}
    }}"#;
    let d = Deployment::parse(Path::new("d.json"), text, &Map::new()).unwrap();
    assert_eq!(
        d.resources["user"].dependencies(),
        vec!["hello".to_string()]
    );
    assert!(d.resources["hello"].refs.is_empty());
}

#[test]
fn references_inside_parameters_count_as_dependencies() {
    let params = json!({"wired": {"from": {"$ref": "hello#content"}}})
        .as_object()
        .unwrap()
        .clone();
    let text = json!({
        "providers": local(),
        "resources": {
            "hello": {"provider": "local", "type": "memo", "inputs": {"value": 1}},
            "user": {"provider": "local", "type": "memo", "inputs": {"value": {"$param": "wired"}}}
        }
    })
    .to_string();
    let d = Deployment::parse(Path::new("d.json"), &text, &params).unwrap();
    let user = &d.resources["user"];
    assert_eq!(user.dependencies(), vec!["hello".to_string()]);
    let outputs = Json::from(json!({"content": "C"}));
    assert_eq!(
        user.resolve(&|_, o| outputs.get_raw(o)).unwrap(),
        json!({"value": {"from": "C"}})
    );
}

#[test]
fn each_mistake_names_its_place() {
    let cases = [
        (
            json!({"providers": local(), "resources": {"a": {"provider": "nope", "type": "file"}}}),
            "resources.a.provider",
            "unknown provider `nope`",
        ),
        (
            json!({"providers": local(), "resources": {"a": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "b#value"}}}}}),
            "resources.a.inputs.value",
            "does not declare",
        ),
        (
            json!({"providers": local(), "resources": {"a": {"provider": "local", "type": "memo", "inputs": {"value": {"$param": "missing"}}}}}),
            "resources.a.inputs.value",
            "missing parameter `missing`",
        ),
        (
            json!({"providers": local(), "resources": {
            "a": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "b#value"}}},
            "b": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "a#value"}}}}}),
            "resources",
            "dependency cycle: a -> b -> a",
        ),
    ];
    for (deployment, place, message) in cases {
        let e = parse(deployment).unwrap_err();
        assert_eq!(e.place, place, "{e}");
        assert!(e.message.contains(message), "{e}");
    }
}

#[test]
fn a_dollar_key_is_a_marker_an_escape_or_an_error() {
    let deployment = |inputs: Value| {
        parse(json!({"providers": local(), "resources": {
            "x": {"provider": "local", "type": "memo", "inputs": {}},
            "y": {"provider": "local", "type": "memo", "inputs": inputs}
        }}))
    };
    let cases = [
        (
            json!({"v": {"$reff": "x#o"}}),
            "resources.y.inputs.v",
            "unknown marker `$reff`: did you mean `$ref`?",
        ),
        (
            json!({"v": {"$ref": 42}}),
            "resources.y.inputs.v",
            "`$ref` takes a string \"ADDRESS#OUTPUT\", not a number",
        ),
        (
            json!({"v": {"$ref": "x#o", "extra": 1}}),
            "resources.y.inputs.v",
            "a `$ref` object has no other keys, but this one also has `extra`",
        ),
        (
            json!({"v": {"$param": 5}}),
            "resources.y.inputs.v",
            "`$param` takes a string \"NAME\", not a number",
        ),
        (
            json!({"v": [{"$cap": "x#h"}]}),
            "resources.y.inputs.v[0]",
            "`$cap` hands over a capability and must be an input's whole value",
        ),
        (
            json!({"v": {"deep": {"$cap": "x#h"}}}),
            "resources.y.inputs.v.deep",
            "must be an input's whole value",
        ),
        (
            json!({"$ref": "x#o"}),
            "resources.y.inputs",
            "`inputs` is an object of input names",
        ),
        (
            json!({"v": {"a": {"$unknown": 1}}}),
            "resources.y.inputs.v.a",
            "write `$$unknown` for a literal key `$unknown`",
        ),
        (
            json!({"v": {"$param": "wired"}}),
            "resources.y.inputs.v",
            "missing parameter `wired`",
        ),
    ];
    for (inputs, place, message) in cases {
        let e = deployment(inputs.clone()).unwrap_err();
        assert_eq!(e.place, place, "{inputs}: {e}");
        assert!(e.message.contains(message), "{inputs}: {e}");
    }
    // The escape: `$$…` is a literal `$…` key, wherever it is, and never a reference.
    let d = deployment(json!({"$$top": {"$$ref": "x#o"}, "v": [{"$$cap": 1, "$ref2": 0}]}));
    let e = d.unwrap_err();
    assert!(e.message.contains("unknown marker `$ref2`"), "{e}");
    let d =
        deployment(json!({"$$top": {"$$ref": "x#o"}, "v": [{"$$cap": 1}], "w": {"$ref": "x#o"}}))
            .unwrap();
    let y = &d.resources["y"];
    assert_eq!(y.refs.len(), 1, "only the real reference counts");
    assert_eq!(y.input_names(), vec!["$top", "v", "w"]);
    let outputs = Json::from(json!({"o": {"$$kept": "as the provider wrote it"}}));
    assert_eq!(
        y.resolve(&|_, o| outputs.get_raw(o)).unwrap(),
        json!({"$top": {"$ref": "x#o"}, "v": [{"$cap": 1}], "w": {"$$kept": "as the provider wrote it"}})
    );
}

#[test]
fn a_key_named_twice_is_an_error_not_last_wins() {
    let text = r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
        "a": {"provider": "local", "type": "memo", "inputs": {"value": 1}},
        "a": {"provider": "local", "type": "memo", "inputs": {"value": 2}}
    }}"#;
    let e = Deployment::parse(Path::new("d.json"), text, &Map::new()).unwrap_err();
    assert_eq!(e.place, "resources.a");
    assert!(e.message.contains("declared twice"), "{e}");
    let text = r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
        "a": {"provider": "local", "type": "memo", "inputs": {"value": {"k": 1, "k": 2}}}
    }}"#;
    let e = Deployment::parse(Path::new("d.json"), text, &Map::new()).unwrap_err();
    assert_eq!(e.place, "resources.a.inputs");
    assert!(e.message.contains("the key `k` appears twice"), "{e}");
    let text = r#"{"providers": {}, "providers": {}}"#;
    assert!(Deployment::parse(Path::new("d.json"), text, &Map::new()).is_err());
}

#[test]
fn names_with_control_characters_are_refused_and_never_printed_raw() {
    let e = parse(json!({"providers": local(), "resources": {
        "evil\u{1b}[31m\nname": {"provider": "local", "type": "memo"}
    }}))
    .unwrap_err();
    assert!(e.message.contains("control characters"), "{e}");
    let shown = e.to_string();
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\n'),
        "{shown:?}"
    );
    assert!(shown.contains("evil\\u{1b}[31m\\nname"), "{shown}");
}

#[test]
fn refs_resolve_from_outputs() {
    let d = parse(json!({
        "providers": local(),
        "resources": {
            "x": {"provider": "local", "type": "memo", "inputs": {}},
            "y": {"provider": "local", "type": "memo", "inputs": {
                "a": {"$ref": "x#o"},
                "b": [1, {"$ref": "x#p"}, {"$$ref": "x#o", "more": true}, {"$$ref": "x#o"}],
                "c": "{\"$ref\":\"x#o\"}",
                "d": {"nested": {"$ref": "x#weird"}}
            }}
        }
    }))
    .unwrap();
    let y = &d.resources["y"];
    let outputs = Json::from(json!({"o": "O", "p": [true, null], "weird": "q\"}"}));
    let known = |address: &str, output: &str| {
        (address == "x" && output != "p")
            .then(|| outputs.get_raw(output))
            .flatten()
    };
    assert_eq!(y.resolve(&known), None, "x#p is unknown");
    let all = |_: &str, output: &str| outputs.get_raw(output);
    assert_eq!(
        y.resolve(&all).unwrap(),
        json!({
            "a": "O",
            "b": [1, [true, null], {"$ref": "x#o", "more": true}, {"$ref": "x#o"}],
            "c": "{\"$ref\":\"x#o\"}",
            "d": {"nested": "q\"}"}
        })
    );
}
