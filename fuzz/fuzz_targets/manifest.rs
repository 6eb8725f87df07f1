//! Arbitrary bytes as a manifest file: parsing must never panic or hang, and whatever it
//! accepts must build a model that diffs cleanly against itself.
#![no_main]

use ambit_control::model::Model;
use ambit_control::model::parse::{parse_file, yaml_lines};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_file(text) {
        Ok(parsed) => {
            let model = Model::from_objects(1, parsed.objects);
            assert!(model.diff(&model).is_empty());
            let _ = model.counts();
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            for e in errors {
                // Every error points inside the file.
                assert!(e.line >= 1);
                assert!(e.line <= yaml_lines(text).count() as u64 + 1, "{e:?}");
                let _ = e.to_string();
            }
        }
    }
});
