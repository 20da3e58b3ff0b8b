//! Secrets encrypted before they are written, for every backend: a value the state marks
//! sensitive (`ResourceState::sensitive`, `Record::Intent::sensitive`) is stored as
//! `{"$encrypted": "capstan1:KEY:BASE64"}`, ChaCha20-Poly1305 under a data key, bound to its
//! resource's address and its place (a value moved elsewhere does not open).
//!
//! The data key is random, one per state (a new one per `rekey`), and stored only sealed with
//! [age](https://age-encryption.org) to the user's keys: X25519 recipients (an identity file,
//! `CAPSTAN_STATE_IDENTITY`, plus more recipients for a team, `CAPSTAN_STATE_RECIPIENTS`) or a
//! passphrase (`CAPSTAN_STATE_PASSPHRASE`, scrypt). age's work happens once per command, not
//! once per value, so encryption costs a cipher call per secret.
//!
//! Without a key a state still loads: its encrypted values stay as they are, and the load
//! says which resources hold them, for the commands that would need them to refuse.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use serde_json::Value;

use crate::{now_unix, PendingOperation, Record, ResourceState, State};
use capstan_schema::Json;

/// The key of an encrypted value's object.
pub const ENCRYPTED: &str = "$encrypted";
const PREFIX: &str = "capstan1:";

/// The environment variables that give the key (`CAPSTAN_STATE_IDENTITY`: an identity file,
/// or the identity itself).
pub const IDENTITY_ENV: &str = "CAPSTAN_STATE_IDENTITY";
pub const RECIPIENTS_ENV: &str = "CAPSTAN_STATE_RECIPIENTS";
pub const PASSPHRASE_ENV: &str = "CAPSTAN_STATE_PASSPHRASE";

/// What the user gave to seal and open the state's data keys.
pub struct Keys {
    kind: KeyKind,
}

enum KeyKind {
    Identities {
        identities: Vec<age::x25519::Identity>,
        recipients: Vec<age::x25519::Recipient>,
    },
    Passphrase(age::secrecy::SecretString),
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.kind {
            KeyKind::Identities { .. } => "Keys(age identities)",
            KeyKind::Passphrase(_) => "Keys(passphrase)",
        })
    }
}

impl Keys {
    /// The keys the environment gives (`CAPSTAN_STATE_IDENTITY`, `CAPSTAN_STATE_RECIPIENTS`,
    /// `CAPSTAN_STATE_PASSPHRASE`), if any; what is wrong with them, if something is.
    pub fn from_env() -> Result<Option<Arc<Keys>>, String> {
        let get = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self::from_values(
            get(IDENTITY_ENV).as_deref(),
            get(RECIPIENTS_ENV).as_deref(),
            get(PASSPHRASE_ENV),
        )
    }

    /// [`from_env`](Self::from_env) from the values given.
    pub fn from_values(
        identity_file: Option<&str>,
        recipients_file: Option<&str>,
        passphrase: Option<String>,
    ) -> Result<Option<Arc<Keys>>, String> {
        match (identity_file, passphrase) {
            (Some(_), Some(_)) => Err(format!(
                "both {IDENTITY_ENV} and {PASSPHRASE_ENV} are set: give the state's key one way"
            )),
            (None, Some(passphrase)) => {
                if recipients_file.is_some() {
                    return Err(format!(
                        "{RECIPIENTS_ENV} adds recipients to an identity ({IDENTITY_ENV}); a passphrase has none"
                    ));
                }
                Ok(Some(Arc::new(Keys {
                    kind: KeyKind::Passphrase(passphrase.into()),
                })))
            }
            (Some(file), None) => {
                // The identity itself (a CI secret), or the file that holds it.
                let identities = if file.trim_start().starts_with("AGE-SECRET-KEY-") {
                    parse_identities(file, IDENTITY_ENV)?
                } else {
                    read_identities(Path::new(file))?
                };
                let mut recipients: Vec<_> = identities.iter().map(|i| i.to_public()).collect();
                if let Some(more) = recipients_file {
                    recipients.extend(read_recipients(Path::new(more))?);
                }
                Ok(Some(Arc::new(Keys {
                    kind: KeyKind::Identities {
                        identities,
                        recipients,
                    },
                })))
            }
            (None, None) if recipients_file.is_some() => Err(format!(
                "{RECIPIENTS_ENV} is set but {IDENTITY_ENV} is not: the state's key is opened with an identity"
            )),
            (None, None) => Ok(None),
        }
    }

    /// A data key sealed with age, as base64 text.
    fn seal(&self, key: &[u8; 32]) -> Result<String, String> {
        let encryptor = match &self.kind {
            KeyKind::Identities { recipients, .. } => {
                age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                    .map_err(|e| e.to_string())?
            }
            KeyKind::Passphrase(passphrase) => {
                age::Encryptor::with_user_passphrase(passphrase.clone())
            }
        };
        let mut sealed = Vec::new();
        let mut writer = encryptor
            .wrap_output(&mut sealed)
            .map_err(|e| e.to_string())?;
        writer.write_all(key).map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())?;
        Ok(base64::engine::general_purpose::STANDARD.encode(sealed))
    }

    /// Opens a sealed data key, if these keys can.
    fn open(&self, sealed: &str) -> Result<[u8; 32], String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed.trim())
            .map_err(|e| format!("the sealed key is not base64: {e}"))?;
        let decryptor = age::Decryptor::new(&bytes[..]).map_err(|e| e.to_string())?;
        let scrypt;
        let identities: Vec<&dyn age::Identity> = match &self.kind {
            KeyKind::Identities { identities, .. } => {
                identities.iter().map(|i| i as &dyn age::Identity).collect()
            }
            KeyKind::Passphrase(passphrase) => {
                scrypt = age::scrypt::Identity::new(passphrase.clone());
                vec![&scrypt as &dyn age::Identity]
            }
        };
        let mut reader = decryptor
            .decrypt(identities.into_iter())
            .map_err(|e| e.to_string())?;
        let mut key = [0u8; 32];
        reader.read_exact(&mut key).map_err(|e| e.to_string())?;
        Ok(key)
    }

    /// Which way this key was given, for messages.
    pub fn described(&self) -> &'static str {
        match self.kind {
            KeyKind::Identities { .. } => IDENTITY_ENV,
            KeyKind::Passphrase(_) => PASSPHRASE_ENV,
        }
    }
}

/// Identities from an age identity file (`AGE-SECRET-KEY-1…` lines, `#` comments), which
/// must be its owner's alone.
fn read_identities(path: &Path) -> Result<Vec<age::x25519::Identity>, String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{IDENTITY_ENV}={shown}: {e}"))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{IDENTITY_ENV}={shown} can be read by other users: chmod 600 it (it opens every secret of the state)"
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{IDENTITY_ENV}={shown}: {e}"))?;
    parse_identities(&text, &format!("{IDENTITY_ENV}={shown}"))
}

/// Identities from text (`AGE-SECRET-KEY-1…` lines, `#` comments); `what` names where it
/// came from (never the key itself).
fn parse_identities(text: &str, what: &str) -> Result<Vec<age::x25519::Identity>, String> {
    let mut identities = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let identity = line.parse::<age::x25519::Identity>().map_err(|_| {
            format!(
                "{what}: line {} is not an age identity (AGE-SECRET-KEY-1…; `age-keygen` makes one)",
                n + 1
            )
        })?;
        identities.push(identity);
    }
    if identities.is_empty() {
        return Err(format!(
            "{what} holds no age identity (AGE-SECRET-KEY-1…; `age-keygen` makes one)"
        ));
    }
    Ok(identities)
}

/// Recipients from a file of `age1…` lines.
fn read_recipients(path: &Path) -> Result<Vec<age::x25519::Recipient>, String> {
    let shown = path.display();
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{RECIPIENTS_ENV}={shown}: {e}"))?;
    let mut recipients = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        recipients.push(line.parse::<age::x25519::Recipient>().map_err(|_| {
            format!(
                "{RECIPIENTS_ENV}={shown}: line {} is not an age recipient (age1…)",
                n + 1
            )
        })?);
    }
    Ok(recipients)
}

/// A data key as stored: its id and the key sealed with age.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredKey {
    pub id: String,
    pub sealed: String,
    pub time: u64,
}

/// A data key that encrypts values.
struct DataKey {
    id: String,
    cipher: ChaCha20Poly1305,
}

/// The state's data keys, opened: the newest encrypts what is written, any opens what was.
pub struct Crypt {
    keys: Vec<DataKey>,
}

impl std::fmt::Debug for Crypt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        write!(f, "Crypt({ids:?})")
    }
}

impl Crypt {
    /// Opens the stored keys that `keys` opens; fails if none does (the key given is not one
    /// this state was sealed to). Values under a key that did not open stay as they are (an
    /// older key, from before a `rekey` that left its holder out).
    pub fn open(stored: &[StoredKey], keys: &Keys) -> Result<Crypt, String> {
        let mut opened = Vec::new();
        let mut last_error = String::new();
        for key in stored {
            match keys.open(&key.sealed) {
                Ok(bytes) => opened.push(DataKey {
                    id: key.id.clone(),
                    cipher: ChaCha20Poly1305::new((&bytes).into()),
                }),
                Err(e) => last_error = e,
            }
        }
        // The newest must open: it is the one new secrets are sealed with.
        if opened.last().map(|k| &k.id) != stored.last().map(|k| &k.id) {
            return Err(format!(
                "the key in {} does not open this state's secrets ({last_error}); the state was sealed to other keys: use one of those, or ask whoever holds one to add yours (`capstan state rekey`)",
                keys.described()
            ));
        }
        Ok(Crypt { keys: opened })
    }

    /// A new data key, sealed to `keys`, to store; and the `Crypt` that uses it (beside
    /// `older`, which still open what they encrypted).
    pub fn new_key(keys: &Keys, older: Option<&Crypt>) -> Result<(StoredKey, Crypt), String> {
        let key = ChaCha20Poly1305::generate_key(&mut OsRng);
        let mut id_bytes = [0u8; 6];
        id_bytes.copy_from_slice(&ChaCha20Poly1305::generate_nonce(&mut OsRng)[..6]);
        let id: String = id_bytes.iter().map(|b| format!("{b:02x}")).collect();
        let raw: [u8; 32] = key.into();
        let sealed = keys.seal(&raw)?;
        let mut crypt = Crypt { keys: Vec::new() };
        if let Some(older) = older {
            for k in &older.keys {
                crypt.keys.push(DataKey {
                    id: k.id.clone(),
                    cipher: k.cipher.clone(),
                });
            }
        }
        crypt.keys.push(DataKey {
            id: id.clone(),
            cipher: ChaCha20Poly1305::new(&key),
        });
        Ok((
            StoredKey {
                id,
                sealed,
                time: now_unix(),
            },
            crypt,
        ))
    }

    fn encrypt(&self, plain: &[u8], aad: &str) -> String {
        let key = self.keys.last().expect("a Crypt has a key");
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = key
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: aad.as_bytes(),
                },
            )
            .expect("ChaCha20-Poly1305 encrypts any message");
        let mut bytes = nonce.to_vec();
        bytes.extend(sealed);
        format!(
            "{PREFIX}{}:{}",
            key.id,
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
        )
    }

    /// The value `text` encrypts, if one of the keys opens it; `None` if none is the one.
    fn decrypt(&self, text: &str, aad: &str) -> Result<Option<Value>, String> {
        let Some((id, body)) = text.strip_prefix(PREFIX).and_then(|t| t.split_once(':')) else {
            return Err("not an encrypted value of Capstan's".into());
        };
        let Some(key) = self.keys.iter().find(|k| k.id == id) else {
            return Ok(None);
        };
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(body)
            .map_err(|e| e.to_string())?;
        if bytes.len() < 12 {
            return Err("too short".into());
        }
        let (nonce, sealed) = bytes.split_at(12);
        let plain = key
            .cipher
            .decrypt(
                nonce.into(),
                Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| "it does not open: changed, or moved from elsewhere".to_string())?;
        serde_json::from_slice(&plain)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

/// Whether a record holds values that must be encrypted.
pub fn needs_sealing(record: &Record) -> bool {
    match record {
        Record::Intent { sensitive, .. } => !sensitive.is_empty(),
        Record::Done { state, .. } => !state.sensitive.is_empty(),
        _ => false,
    }
}

/// `record` with its sensitive values encrypted.
pub fn seal_record(crypt: &Crypt, record: &Record) -> Record {
    let mut record = record.clone();
    match &mut record {
        Record::Intent {
            address,
            inputs,
            sensitive,
            ..
        } => seal_inputs(crypt, address, inputs, sensitive),
        Record::Done { address, state } => seal_resource(crypt, address, state),
        _ => {}
    }
    record
}

/// `state` with its sensitive values encrypted (for a snapshot).
pub fn seal_state(crypt: &Crypt, state: &State) -> State {
    let mut sealed = state.clone();
    for (address, resource) in sealed.resources.iter_mut() {
        if !resource.sensitive.is_empty() {
            seal_resource(crypt, address, resource);
        }
    }
    for (address, op) in sealed.pending.iter_mut() {
        if !op.sensitive.is_empty() {
            seal_inputs(crypt, address, &mut op.inputs, &op.sensitive);
        }
    }
    sealed
}

/// The pointers to seal: those inside another of them are sealed with it (sealing the inner
/// one first would leave it sealed inside the outer one once that is opened).
fn outermost(pointers: &[String]) -> Vec<&String> {
    pointers
        .iter()
        .filter(|p| {
            !pointers
                .iter()
                .any(|outer| outer != *p && p.starts_with(&format!("{outer}/")))
        })
        .collect()
}

fn seal_resource(crypt: &Crypt, address: &str, state: &mut ResourceState) {
    let mut whole =
        serde_json::json!({"inputs": state.inputs.value(), "outputs": state.outputs.value()});
    for pointer in outermost(&state.sensitive) {
        seal_at(crypt, address, &mut whole, pointer);
    }
    state.inputs = Json::from_value(&whole["inputs"]);
    state.outputs = Json::from_value(&whole["outputs"]);
}

fn seal_inputs(crypt: &Crypt, address: &str, inputs: &mut Json, sensitive: &[String]) {
    let mut whole = serde_json::json!({"inputs": inputs.value()});
    for pointer in outermost(sensitive) {
        seal_at(crypt, address, &mut whole, pointer);
    }
    *inputs = Json::from_value(&whole["inputs"]);
}

fn seal_at(crypt: &Crypt, address: &str, whole: &mut Value, pointer: &str) {
    if let Some(value) = whole.pointer_mut(pointer) {
        if is_encrypted(value) {
            return;
        }
        let plain = serde_json::to_vec(value).expect("values serialize");
        let text = crypt.encrypt(&plain, &aad(address, pointer));
        *value = serde_json::json!({ ENCRYPTED: text });
    }
}

fn aad(address: &str, pointer: &str) -> String {
    format!("{address}\n{pointer}")
}

fn is_encrypted(value: &Value) -> bool {
    value
        .as_object()
        .is_some_and(|o| o.len() == 1 && o.get(ENCRYPTED).is_some_and(Value::is_string))
}

/// What opening found that it could not open.
#[derive(Debug, Default)]
pub struct Opening {
    /// Addresses holding values no key given opens.
    pub locked: BTreeSet<String>,
    /// Values that are damaged or were moved (they fail their check).
    pub damaged: Vec<String>,
}

/// Opens the encrypted values in `record` that `crypt` can (all of them, if it holds the
/// state's keys); notes the others.
pub fn open_record(crypt: Option<&Crypt>, record: &mut Record, opening: &mut Opening) {
    match record {
        Record::Intent {
            address, inputs, ..
        } => open_json(crypt, address, "/inputs", inputs, opening),
        Record::Done { address, state } => {
            open_json(crypt, address, "/inputs", &mut state.inputs, opening);
            open_json(crypt, address, "/outputs", &mut state.outputs, opening);
        }
        _ => {}
    }
}

/// Opens the encrypted values of a whole state (a snapshot).
pub fn open_state(crypt: Option<&Crypt>, state: &mut State, opening: &mut Opening) {
    for (address, resource) in state.resources.iter_mut() {
        open_json(crypt, address, "/inputs", &mut resource.inputs, opening);
        open_json(crypt, address, "/outputs", &mut resource.outputs, opening);
    }
    for (address, op) in state.pending.iter_mut() {
        let PendingOperation { inputs, .. } = op;
        open_json(crypt, address, "/inputs", inputs, opening);
    }
}

fn open_json(
    crypt: Option<&Crypt>,
    address: &str,
    prefix: &str,
    json: &mut Json,
    opening: &mut Opening,
) {
    // Most values hold no secret: a look at the text first.
    if !json.text().contains(ENCRYPTED) {
        return;
    }
    let mut value = json.value();
    let mut changed = false;
    open_value(crypt, address, prefix, &mut value, opening, &mut changed);
    if changed {
        *json = Json::from_value(&value);
    }
}

fn open_value(
    crypt: Option<&Crypt>,
    address: &str,
    pointer: &str,
    value: &mut Value,
    opening: &mut Opening,
    changed: &mut bool,
) {
    if is_encrypted(value) {
        let text = value[ENCRYPTED].as_str().unwrap_or_default().to_string();
        match crypt.map(|c| c.decrypt(&text, &aad(address, pointer))) {
            Some(Ok(Some(plain))) => {
                *value = plain;
                // What an older capstan sealed inside it (an inner secret sealed first).
                let mut inner = false;
                open_value(crypt, address, pointer, value, opening, &mut inner);
                *changed = true;
            }
            Some(Err(why)) => opening.damaged.push(format!("{address}{pointer}: {why}")),
            Some(Ok(None)) | None => {
                opening.locked.insert(address.to_string());
            }
        }
        return;
    }
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                let at = format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1"));
                open_value(crypt, address, &at, v, opening, changed);
            }
        }
        Value::Array(items) => {
            for (n, v) in items.iter_mut().enumerate() {
                open_value(
                    crypt,
                    address,
                    &format!("{pointer}/{n}"),
                    v,
                    opening,
                    changed,
                );
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity_keys() -> (tempfile::TempDir, Arc<Keys>, String) {
        use age::secrecy::ExposeSecret;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let identity = age::x25519::Identity::generate();
        let file = dir.path().join("key.txt");
        std::fs::write(
            &file,
            format!("# test\n{}\n", identity.to_string().expose_secret()),
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let keys = Keys::from_values(Some(file.to_str().unwrap()), None, None)
            .unwrap()
            .unwrap();
        (dir, keys, identity.to_public().to_string())
    }

    fn resource(secret: &str) -> ResourceState {
        ResourceState {
            provider: "p".into(),
            resource_type: "t".into(),
            inputs: Json::from_value(&serde_json::json!({"password": secret, "name": "db"})),
            outputs: Json::from_value(&serde_json::json!({"token": format!("t-{secret}")})),
            dependencies: vec![],
            parent: None,
            sensitive: vec!["/inputs/password".into(), "/outputs/token".into()],
            tainted: false,
        }
    }

    #[test]
    fn sealed_values_leave_no_clear_text_and_open_only_with_the_key_in_place() {
        let (_dir, keys, _) = identity_keys();
        let (stored, crypt) = Crypt::new_key(&keys, None).unwrap();
        let done = Record::Done {
            address: "db".into(),
            state: resource("hunter2-secret"),
        };
        let sealed = seal_record(&crypt, &done);
        let text = serde_json::to_string(&sealed).unwrap();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            text.contains("\"name\":\"db\""),
            "what is not secret stays readable"
        );
        // Opened with the stored key again (a new command).
        let again = Crypt::open(std::slice::from_ref(&stored), &keys).unwrap();
        let mut opened = sealed.clone();
        let mut opening = Opening::default();
        open_record(Some(&again), &mut opened, &mut opening);
        assert_eq!(opened, done);
        assert!(opening.locked.is_empty() && opening.damaged.is_empty());
        // Without a key: left as it is, and the address noted.
        let mut locked = sealed.clone();
        let mut opening = Opening::default();
        open_record(None, &mut locked, &mut opening);
        assert_eq!(locked, sealed);
        assert_eq!(opening.locked.iter().collect::<Vec<_>>(), ["db"]);
        // Moved to another resource: it does not open.
        let Record::Done { state, .. } = sealed else {
            unreachable!()
        };
        let mut moved = Record::Done {
            address: "other".into(),
            state,
        };
        let mut opening = Opening::default();
        open_record(Some(&again), &mut moved, &mut opening);
        assert_eq!(opening.damaged.len(), 2, "{:?}", opening.damaged);
        // Another identity does not open the data key.
        let (_dir2, other, _) = identity_keys();
        let e = Crypt::open(&[stored], &other).unwrap_err();
        assert!(e.contains("does not open"), "{e}");
    }

    #[test]
    fn a_secret_inside_a_secret_opens_whole() {
        let (_dir, keys, _) = identity_keys();
        let (_, crypt) = Crypt::new_key(&keys, None).unwrap();
        let mut state = resource("x");
        state.outputs = Json::from_value(&serde_json::json!({"token": {"value": "inner-secret"}}));
        state.sensitive = vec!["/outputs/token/value".into(), "/outputs/token".into()];
        let done = Record::Done {
            address: "db".into(),
            state,
        };
        let sealed = seal_record(&crypt, &done);
        assert!(!serde_json::to_string(&sealed)
            .unwrap()
            .contains("inner-secret"));
        let mut opened = sealed;
        let mut opening = Opening::default();
        open_record(Some(&crypt), &mut opened, &mut opening);
        assert_eq!(opened, done);
    }

    #[test]
    fn a_passphrase_seals_the_key_and_keys_are_checked() {
        let keys = Keys::from_values(None, None, Some("correct horse".into()))
            .unwrap()
            .unwrap();
        let (stored, _) = Crypt::new_key(&keys, None).unwrap();
        let wrong = Keys::from_values(None, None, Some("battery staple".into()))
            .unwrap()
            .unwrap();
        assert!(Crypt::open(std::slice::from_ref(&stored), &wrong).is_err());
        assert!(Crypt::open(&[stored], &keys).is_ok());
        assert!(Keys::from_values(Some("/x"), None, Some("p".into())).is_err());
        assert!(Keys::from_values(None, Some("/x"), None).is_err());
        let e = Keys::from_values(Some("/nonexistent/key"), None, None).unwrap_err();
        assert!(e.contains(IDENTITY_ENV), "{e}");
        // The identity itself, as a CI secret holds it; a broken one is not repeated back.
        use age::secrecy::ExposeSecret;
        let identity = age::x25519::Identity::generate();
        let text = identity.to_string().expose_secret().to_string();
        let keys = Keys::from_values(Some(&text), None, None).unwrap().unwrap();
        let (stored, _) = Crypt::new_key(&keys, None).unwrap();
        assert!(Crypt::open(&[stored], &keys).is_ok());
        let broken = format!("{}x", &text[..text.len() - 1]);
        let e = Keys::from_values(Some(&broken), None, None).unwrap_err();
        assert!(!e.contains(&broken[20..]), "{e}");
    }

    #[test]
    fn recipients_added_for_a_team_open_it_too() {
        let (_dir, _, _) = identity_keys();
        let dir = tempfile::tempdir().unwrap();
        let alice = age::x25519::Identity::generate();
        let bob = age::x25519::Identity::generate();
        let write = |name: &str, text: String, mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path.display().to_string()
        };
        use age::secrecy::ExposeSecret;
        let alice_file = write(
            "alice",
            alice.to_string().expose_secret().to_string(),
            0o600,
        );
        let bob_file = write("bob", bob.to_string().expose_secret().to_string(), 0o600);
        let team = write("team", format!("{}\n", bob.to_public()), 0o644);
        let keys = Keys::from_values(Some(&alice_file), Some(&team), None)
            .unwrap()
            .unwrap();
        let (stored, _) = Crypt::new_key(&keys, None).unwrap();
        let bob_keys = Keys::from_values(Some(&bob_file), None, None)
            .unwrap()
            .unwrap();
        assert!(Crypt::open(&[stored], &bob_keys).is_ok());
        // An identity file others can read is refused.
        let loose = write(
            "loose",
            alice.to_string().expose_secret().to_string(),
            0o644,
        );
        assert!(Keys::from_values(Some(&loose), None, None)
            .unwrap_err()
            .contains("chmod 600"));
    }
}
