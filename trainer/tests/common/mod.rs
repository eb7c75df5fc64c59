//! Shared by the trainer's integration tests.

use oxtune_trainer::tiny::{random_weights, tiny_default_config};
use oxtune_trainer::{GptOssConfig, Model};

/// The embedded model's architecture and real vocabulary, made smaller (hidden 64, 2 layers) so a
/// training step takes well under a second.
pub fn small_model() -> Model {
    let base = tiny_default_config();
    let cfg = GptOssConfig {
        hidden_size: 64,
        intermediate_size: 64,
        num_hidden_layers: 2,
        layer_types: base.layer_types[..2].to_vec(),
        ..base
    };
    cfg.validate().unwrap();
    let w = random_weights(&cfg, 11);
    Model::new(cfg, w)
}
