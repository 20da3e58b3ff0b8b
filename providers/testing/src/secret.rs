//! `secret`: sensitive inputs and outputs.

use super::*;

// ---- secret --------------------------------------------------------------------------------

/// A type whose output is a secret, and which leaks it everywhere a careless provider could:
/// its log, a tracing event, its stderr, and its error message. The core must hide it in all.
pub(super) struct Secret;

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct SecretIn {
    /// The token to issue (sensitive); made up when absent
    #[serde(default)]
    pub(super) seed: Option<String>,
    /// Fail after issuing, with the token in the error
    #[serde(default)]
    pub(super) fail: bool,
}

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct SecretOut {
    /// The token (sensitive)
    pub(super) token: String,
    /// The token's length
    pub(super) length: usize,
}

impl Resource for Secret {
    type Inputs = SecretIn;
    type Outputs = SecretOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("secret")
            .description("Issues a token (a sensitive output), and carelessly prints it too")
            .inputs_from::<SecretIn>()
            .outputs_from::<SecretOut>()
            .sensitive("seed")
            .sensitive("token")
    }

    async fn create(&self, op: &Operation, inputs: SecretIn) -> Result<SecretOut, OperationError> {
        let token = inputs
            .seed
            .unwrap_or_else(|| format!("tok-{}", unique_id()));
        op.log(LogStream::Stdout, format!("issued {token}")).await;
        tracing::info!(token = %token, "issued token {token}");
        eprintln!("testing provider: issued {token}");
        if inputs.fail {
            return Err(
                OperationError::permanent(format!("could not store {token}"))
                    .with_details(format!("token was {token}")),
            );
        }
        Ok(SecretOut {
            length: token.len(),
            token,
        })
    }
}
