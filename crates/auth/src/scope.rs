//! SMART on FHIR scopes: the grammar (v1 and v2), narrowing a request down to
//! what may be granted, and what a granted set permits.
//!
//! References are to SMART App Launch 2.2, "scopes-and-launch-context"
//! (<https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html>).
//!
//! Everything here is pure: no IO, no clock, no async.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Whose data a resource scope reaches (the part before the `/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Context {
    /// `patient/`: data of the patient in context.
    Patient,
    /// `user/`: data the signed-in user may see.
    User,
    /// `system/`: data reachable by a client acting on its own (Backend Services).
    System,
}

impl Context {
    /// The scope prefix, without the `/`.
    pub fn as_str(self) -> &'static str {
        match self {
            Context::Patient => "patient",
            Context::User => "user",
            Context::System => "system",
        }
    }

    fn from_prefix(prefix: &str) -> Option<Context> {
        match prefix {
            "patient" => Some(Context::Patient),
            "user" => Some(Context::User),
            "system" => Some(Context::System),
            _ => None,
        }
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One of the five v2 permissions (`c`, `r`, `u`, `d`, `s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Permission {
    /// All permissions, in the `cruds` order the v2 grammar requires.
    pub const ALL: [Permission; 5] = [
        Permission::Create,
        Permission::Read,
        Permission::Update,
        Permission::Delete,
        Permission::Search,
    ];

    /// The letter used in v2 scopes.
    pub fn letter(self) -> char {
        match self {
            Permission::Create => 'c',
            Permission::Read => 'r',
            Permission::Update => 'u',
            Permission::Delete => 'd',
            Permission::Search => 's',
        }
    }

    fn word(self) -> &'static str {
        match self {
            Permission::Create => "create",
            Permission::Read => "read",
            Permission::Update => "update",
            Permission::Delete => "delete",
            Permission::Search => "search",
        }
    }
}

/// A set of permissions; the v2 `cruds` letters as flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions {
    pub create: bool,
    pub read: bool,
    pub update: bool,
    pub delete: bool,
    pub search: bool,
}

impl Permissions {
    /// No permission at all.
    pub const NONE: Permissions = Permissions {
        create: false,
        read: false,
        update: false,
        delete: false,
        search: false,
    };
    /// `cruds`, which is v1 `*`.
    pub const ALL: Permissions = Permissions {
        create: true,
        read: true,
        update: true,
        delete: true,
        search: true,
    };
    /// `rs`, which is v1 `read`.
    pub const READ: Permissions = Permissions {
        create: false,
        read: true,
        update: false,
        delete: false,
        search: true,
    };
    /// `cud`, which is v1 `write`.
    pub const WRITE: Permissions = Permissions {
        create: true,
        read: false,
        update: true,
        delete: true,
        search: false,
    };

    /// Parses the v2 letters. They must be a non-empty subsequence of `cruds`
    /// in that order (SMART 2.2, "Scopes for requesting FHIR resources"), so
    /// `sr`, `rr` and `` are refused.
    pub fn from_v2(letters: &str) -> Option<Permissions> {
        if letters.is_empty() {
            return None;
        }
        let mut perms = Permissions::NONE;
        let mut next = 0;
        for c in letters.chars() {
            // Each letter must come strictly after the previous one in `cruds`.
            let at = Permission::ALL[next..]
                .iter()
                .position(|p| p.letter() == c)?
                + next;
            perms.set(Permission::ALL[at]);
            next = at + 1;
        }
        Some(perms)
    }

    /// Parses the v1 words `read`, `write` and `*`.
    pub fn from_v1(word: &str) -> Option<Permissions> {
        match word {
            "read" => Some(Permissions::READ),
            "write" => Some(Permissions::WRITE),
            "*" => Some(Permissions::ALL),
            _ => None,
        }
    }

    /// The v1 word for these permissions, when there is one that means exactly
    /// the same thing.
    pub fn v1_word(&self) -> Option<&'static str> {
        match *self {
            Permissions::READ => Some("read"),
            Permissions::WRITE => Some("write"),
            Permissions::ALL => Some("*"),
            _ => None,
        }
    }

    /// Whether `permission` is in the set.
    pub fn has(&self, permission: Permission) -> bool {
        match permission {
            Permission::Create => self.create,
            Permission::Read => self.read,
            Permission::Update => self.update,
            Permission::Delete => self.delete,
            Permission::Search => self.search,
        }
    }

    /// Adds `permission` to the set.
    pub fn set(&mut self, permission: Permission) {
        match permission {
            Permission::Create => self.create = true,
            Permission::Read => self.read = true,
            Permission::Update => self.update = true,
            Permission::Delete => self.delete = true,
            Permission::Search => self.search = true,
        }
    }

    /// Whether every permission of `other` is also in `self`.
    pub fn contains(&self, other: &Permissions) -> bool {
        Permission::ALL
            .iter()
            .all(|&p| !other.has(p) || self.has(p))
    }

    /// The permissions in both sets.
    pub fn intersect(&self, other: &Permissions) -> Permissions {
        Permissions {
            create: self.create && other.create,
            read: self.read && other.read,
            update: self.update && other.update,
            delete: self.delete && other.delete,
            search: self.search && other.search,
        }
    }

    /// The permissions in either set.
    pub fn union(&self, other: &Permissions) -> Permissions {
        Permissions {
            create: self.create || other.create,
            read: self.read || other.read,
            update: self.update || other.update,
            delete: self.delete || other.delete,
            search: self.search || other.search,
        }
    }

    /// Whether the set holds no permission.
    pub fn is_empty(&self) -> bool {
        *self == Permissions::NONE
    }

    /// The permissions held, in `cruds` order.
    pub fn iter(&self) -> impl Iterator<Item = Permission> + '_ {
        Permission::ALL.into_iter().filter(|&p| self.has(p))
    }
}

/// The v2 letters, e.g. `rs`.
impl fmt::Display for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in self.iter() {
            write!(f, "{}", p.letter())?;
        }
        Ok(())
    }
}

/// A scope on FHIR resources, such as `patient/Observation.rs?category=laboratory`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceScope {
    pub context: Context,
    /// The resource type; `None` is `*`, every type.
    pub resource_type: Option<String>,
    pub permissions: Permissions,
    /// v2 search restrictions (`?name=value&...`), decoded. A resource must
    /// match all of them, as the parameters of a FHIR search do.
    pub restrictions: Vec<(String, String)>,
    /// Written in the v1 form (`read`, `write`, `*`). Only affects how the
    /// scope is printed, and only when the v1 form can say the same thing.
    pub v1: bool,
}

impl ResourceScope {
    fn parse(text: &str) -> Option<ResourceScope> {
        let (path, query) = match text.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (text, None),
        };
        let (prefix, rest) = path.split_once('/')?;
        let context = Context::from_prefix(prefix)?;
        let (type_part, perms_part) = rest.split_once('.')?;
        let resource_type = match type_part {
            "*" => None,
            name if haven_model::registry::is_resource_type(name) => Some(name.to_owned()),
            // An unknown type could never match anything; treat the scope as
            // unknown so it is dropped rather than granted.
            _ => return None,
        };
        let (permissions, v1) = match Permissions::from_v1(perms_part) {
            Some(perms) => (perms, true),
            None => (Permissions::from_v2(perms_part)?, false),
        };
        let restrictions = match query {
            // Query restrictions exist only in v2.
            Some(_) if v1 => return None,
            Some(query) => parse_query(query)?,
            None => Vec::new(),
        };
        Some(ResourceScope {
            context,
            resource_type,
            permissions,
            restrictions,
            v1,
        })
    }

    /// Whether the scope applies to `resource_type` (its own type or `*`).
    pub fn applies_to(&self, resource_type: &str) -> bool {
        self.resource_type
            .as_deref()
            .is_none_or(|t| t == resource_type)
    }

    /// Whether everything `other` permits is permitted by `self`: same
    /// context, same type or `self` is `*`, more permissions, and no
    /// restriction that `other` does not also have (each restriction only
    /// narrows). The v1/v2 form does not matter.
    pub fn covers(&self, other: &ResourceScope) -> bool {
        self.reaches(other) && self.permissions.contains(&other.permissions)
    }

    /// Like [`covers`](Self::covers), ignoring permissions.
    fn reaches(&self, other: &ResourceScope) -> bool {
        self.context == other.context
            && match (&self.resource_type, &other.resource_type) {
                (None, _) => true,
                (Some(a), Some(b)) => a == b,
                (Some(_), None) => false,
            }
            && self
                .restrictions
                .iter()
                .all(|r| other.restrictions.contains(r))
    }

    /// What both scopes permit, or `None` when that is nothing. Contexts must
    /// be equal; the type is the more specific one; the permissions are the
    /// common ones; the restrictions are those of both (all must hold). The
    /// result keeps `self`'s form (v1 or v2) when the v1 form can express it.
    pub fn intersect(&self, other: &ResourceScope) -> Option<ResourceScope> {
        let mut scope = self.intersect_keeping_form(other)?;
        scope.v1 = scope.v1_representable() && self.v1;
        Some(scope)
    }

    /// [`intersect`](Self::intersect), but `v1` keeps `self.v1` as a wish
    /// for the final form, to be settled once permissions are merged.
    fn intersect_keeping_form(&self, other: &ResourceScope) -> Option<ResourceScope> {
        if self.context != other.context {
            return None;
        }
        let resource_type = match (&self.resource_type, &other.resource_type) {
            (None, t) | (t, None) => t.clone(),
            (Some(a), Some(b)) if a == b => Some(a.clone()),
            _ => return None,
        };
        let permissions = self.permissions.intersect(&other.permissions);
        if permissions.is_empty() {
            return None;
        }
        let mut restrictions = self.restrictions.clone();
        for r in &other.restrictions {
            if !restrictions.contains(r) {
                restrictions.push(r.clone());
            }
        }
        Some(ResourceScope {
            context: self.context,
            resource_type,
            permissions,
            restrictions,
            v1: self.v1,
        })
    }

    fn v1_representable(&self) -> bool {
        self.restrictions.is_empty() && self.permissions.v1_word().is_some()
    }

    fn same_restrictions(&self, other: &ResourceScope) -> bool {
        self.restrictions
            .iter()
            .all(|r| other.restrictions.contains(r))
            && other
                .restrictions
                .iter()
                .all(|r| self.restrictions.contains(r))
    }

    /// Plain words for a consent page.
    pub fn describe(&self) -> String {
        let object = match (self.context, self.resource_type.as_deref()) {
            (Context::Patient, Some(t)) => format!("your {t} records"),
            (Context::Patient, None) => "all your records".to_owned(),
            (Context::User, Some(t)) => format!("{t} records you can access"),
            (Context::User, None) => "all data you can access".to_owned(),
            (Context::System, Some(t)) => format!("all {t} records on this server"),
            (Context::System, None) => "all data on this server".to_owned(),
        };
        let words: Vec<&str> = self.permissions.iter().map(Permission::word).collect();
        let mut text = match words.split_last() {
            None => format!("No access to {object}"),
            Some((last, [])) => format!("{} {object}", capitalize(last)),
            Some((last, init)) => {
                format!("{} and {last} {object}", capitalize(&init.join(", ")))
            }
        };
        for (i, (name, value)) in self.restrictions.iter().enumerate() {
            text.push_str(if i == 0 { " where " } else { " and " });
            text.push_str(&format!("{name} is {value}"));
        }
        text
    }
}

/// The canonical text: v1 form when the scope was v1 and still means the same
/// in v1, else v2 with restrictions form-encoded.
impl fmt::Display for ResourceScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let resource_type = self.resource_type.as_deref().unwrap_or("*");
        write!(f, "{}/{resource_type}.", self.context)?;
        match self.permissions.v1_word() {
            Some(word) if self.v1 && self.restrictions.is_empty() => f.write_str(word),
            _ => {
                write!(f, "{}", self.permissions)?;
                for (i, (name, value)) in self.restrictions.iter().enumerate() {
                    f.write_str(if i == 0 { "?" } else { "&" })?;
                    write!(f, "{}={}", form_encode(name), form_encode(value))?;
                }
                Ok(())
            }
        }
    }
}

/// One scope the server understands.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Resource(ResourceScope),
    /// `openid`: an id_token is wanted.
    OpenId,
    /// `fhirUser`: the id_token names the user's FHIR resource.
    FhirUser,
    /// `profile`: the user's name and profile claims.
    Profile,
    /// `launch`: an EHR launch, context taken from the `launch` parameter.
    Launch,
    /// `launch/patient`: a patient must be in context (standalone launch).
    LaunchPatient,
    /// `launch/encounter`: an encounter must be in context (standalone launch).
    LaunchEncounter,
    /// `offline_access`: a refresh token that outlives the user's session.
    OfflineAccess,
    /// `online_access`: a refresh token bound to the user's session.
    OnlineAccess,
}

impl Scope {
    /// Parses one scope. `None` for anything not understood, which callers
    /// drop: SMART asks servers to ignore scopes they do not recognise.
    pub fn parse(text: &str) -> Option<Scope> {
        Some(match text {
            "openid" => Scope::OpenId,
            "fhirUser" => Scope::FhirUser,
            "profile" => Scope::Profile,
            "launch" => Scope::Launch,
            "launch/patient" => Scope::LaunchPatient,
            "launch/encounter" => Scope::LaunchEncounter,
            "offline_access" => Scope::OfflineAccess,
            "online_access" => Scope::OnlineAccess,
            _ => Scope::Resource(ResourceScope::parse(text)?),
        })
    }

    /// The resource scope, if this is one.
    pub fn as_resource(&self) -> Option<&ResourceScope> {
        match self {
            Scope::Resource(scope) => Some(scope),
            _ => None,
        }
    }

    /// Plain words for a consent page, e.g. "Read and search your Observation
    /// records".
    pub fn describe(&self) -> String {
        match self {
            Scope::Resource(scope) => scope.describe(),
            Scope::OpenId => "Confirm that it is you who signed in".to_owned(),
            Scope::FhirUser => "Know which person's record is yours".to_owned(),
            Scope::Profile => "See your name and profile".to_owned(),
            Scope::Launch => "Receive the context from the launching system".to_owned(),
            Scope::LaunchPatient => "Know which patient record is open".to_owned(),
            Scope::LaunchEncounter => "Know which encounter is open".to_owned(),
            Scope::OfflineAccess => "Stay connected when you are not using it".to_owned(),
            Scope::OnlineAccess => "Stay connected while you are signed in".to_owned(),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Resource(scope) => return scope.fmt(f),
            Scope::OpenId => "openid",
            Scope::FhirUser => "fhirUser",
            Scope::Profile => "profile",
            Scope::Launch => "launch",
            Scope::LaunchPatient => "launch/patient",
            Scope::LaunchEncounter => "launch/encounter",
            Scope::OfflineAccess => "offline_access",
            Scope::OnlineAccess => "online_access",
        })
    }
}

/// A single scope that is not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope: {0}")]
pub struct UnknownScope(pub String);

impl FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(text: &str) -> Result<Scope, UnknownScope> {
        Scope::parse(text).ok_or_else(|| UnknownScope(text.to_owned()))
    }
}

impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Scope, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Scopes without duplicates, in the order first given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScopeSet(Vec<Scope>);

impl ScopeSet {
    /// An empty set.
    pub fn new() -> ScopeSet {
        ScopeSet(Vec::new())
    }

    /// Parses a space-separated `scope` parameter (RFC 6749 section 3.3).
    /// Unknown scopes and duplicates are dropped, never an error.
    pub fn parse(text: &str) -> ScopeSet {
        text.split_ascii_whitespace()
            .filter_map(Scope::parse)
            .collect()
    }

    /// Adds `scope` unless already present.
    pub fn insert(&mut self, scope: Scope) {
        if !self.0.contains(&scope) {
            self.0.push(scope);
        }
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Scope> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `scope` is in the set, as written (no coverage reasoning; see
    /// [`covers`](Self::covers) for that).
    pub fn has(&self, scope: &Scope) -> bool {
        self.0.contains(scope)
    }

    /// Whether an id_token is wanted.
    pub fn contains_openid(&self) -> bool {
        self.has(&Scope::OpenId)
    }

    /// The resource scopes.
    pub fn resource_scopes(&self) -> impl Iterator<Item = &ResourceScope> {
        self.0.iter().filter_map(Scope::as_resource)
    }

    /// Whether any `patient/` scope is present, so a patient must be in context.
    pub fn patient_scoped(&self) -> bool {
        self.resource_scopes()
            .any(|s| s.context == Context::Patient)
    }

    /// Every resource scope that allows `permission` on `resource_type`, with
    /// its context and restrictions; the caller must honour at least one of
    /// them. Empty means not permitted.
    pub fn grants_for(&self, resource_type: &str, permission: Permission) -> Vec<Grant<'_>> {
        self.resource_scopes()
            .filter(|s| s.applies_to(resource_type) && s.permissions.has(permission))
            .map(|s| Grant {
                context: s.context,
                restrictions: &s.restrictions,
            })
            .collect()
    }

    /// Whether everything `scope` permits is permitted by this set. A
    /// non-resource scope must be present. A resource scope is covered when
    /// the scopes of the same context, of its type or `*`, and with no
    /// restriction it lacks, together hold all its permissions (so `r` and
    /// `s` in two scopes cover `rs`).
    pub fn covers(&self, scope: &Scope) -> bool {
        match scope {
            Scope::Resource(wanted) => self
                .resource_scopes()
                .filter(|s| s.reaches(wanted))
                .fold(Permissions::NONE, |acc, s| acc.union(&s.permissions))
                .contains(&wanted.permissions),
            other => self.has(other),
        }
    }

    /// Plain words for each scope, for a consent page, without repeats
    /// (`openid` and `fhirUser` say the same thing).
    pub fn describe(&self) -> Vec<String> {
        let mut lines: Vec<String> = Vec::new();
        for scope in &self.0 {
            let line = scope.describe();
            if !lines.contains(&line) {
                lines.push(line);
            }
        }
        lines
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> ScopeSet {
        let mut set = ScopeSet::new();
        for scope in iter {
            set.insert(scope);
        }
        set
    }
}

impl<'a> IntoIterator for &'a ScopeSet {
    type Item = &'a Scope;
    type IntoIter = std::slice::Iter<'a, Scope>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Space separated, as in the `scope` parameter and token response.
impl fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, scope) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{scope}")?;
        }
        Ok(())
    }
}

/// Stored as the space-separated string.
impl Serialize for ScopeSet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Read with [`ScopeSet::parse`], so unknown scopes are dropped here too.
impl<'de> Deserialize<'de> for ScopeSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ScopeSet, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(ScopeSet::parse(&text))
    }
}

/// One way a request may be allowed: the context it must be checked in and
/// the search restrictions the resource must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant<'a> {
    pub context: Context,
    pub restrictions: &'a [(String, String)],
}

/// What may be granted when `requested` is asked for and `allowed` is what
/// the client is registered for (or the user approved); call once per limit.
///
/// Rules:
/// - A non-resource scope is granted when `allowed` has it.
/// - A resource scope is intersected with each allowed resource scope: the
///   contexts must be equal (a `patient/` request is never met by `user/` or
///   `system/`, which keeps the three apart); `*` on either side yields the
///   other side's type; permissions are the common ones (none: nothing
///   granted); restrictions are those of both sides.
/// - Results for the same context, type and restrictions are merged (`r` from
///   one allowed scope and `s` from another give `rs`), and a result covered
///   by another result is left out.
/// - Each result is written in the form of the scope requested: v1 when that
///   was v1 and v1 can say the same (`rs` is `read`, `cud` is `write`,
///   `cruds` is `*`, no restriction), else v2.
/// - Order follows `requested`.
pub fn narrow(requested: &ScopeSet, allowed: &ScopeSet) -> ScopeSet {
    let mut granted: Vec<Scope> = Vec::new();
    for scope in requested {
        match scope {
            Scope::Resource(wanted) => {
                for offered in allowed.resource_scopes() {
                    if let Some(scope) = wanted.intersect_keeping_form(offered) {
                        merge(&mut granted, scope);
                    }
                }
            }
            other => {
                if allowed.has(other) && !granted.contains(other) {
                    granted.push(other.clone());
                }
            }
        }
    }
    for scope in &mut granted {
        if let Scope::Resource(scope) = scope {
            scope.v1 = scope.v1 && scope.v1_representable();
        }
    }
    drop_covered(granted).into_iter().collect()
}

/// Whether every scope of `narrower` is covered by `wider` (see
/// [`ScopeSet::covers`]). A refresh may only keep or narrow the scopes of the
/// original grant, never widen them.
pub fn is_within(narrower: &ScopeSet, wider: &ScopeSet) -> bool {
    narrower.iter().all(|scope| wider.covers(scope))
}

/// Adds `scope` to `granted`, merging its permissions into a scope of the same
/// context, type and restrictions if there is one.
fn merge(granted: &mut Vec<Scope>, scope: ResourceScope) {
    for existing in granted.iter_mut() {
        if let Scope::Resource(existing) = existing {
            if existing.context == scope.context
                && existing.resource_type == scope.resource_type
                && existing.same_restrictions(&scope)
            {
                existing.permissions = existing.permissions.union(&scope.permissions);
                return;
            }
        }
    }
    granted.push(Scope::Resource(scope));
}

/// Leaves out resource scopes that another one covers, so the granted text
/// stays short. Of two scopes covering each other only the first stays.
fn drop_covered(scopes: Vec<Scope>) -> Vec<Scope> {
    let covered_by_other = |i: usize| {
        let Some(this) = scopes[i].as_resource() else {
            return false;
        };
        scopes.iter().enumerate().any(|(j, other)| {
            other
                .as_resource()
                .is_some_and(|other| j != i && other.covers(this) && (j < i || !this.covers(other)))
        })
    };
    let keep: Vec<bool> = (0..scopes.len()).map(|i| !covered_by_other(i)).collect();
    scopes
        .into_iter()
        .zip(keep)
        .filter_map(|(scope, keep)| keep.then_some(scope))
        .collect()
}

/// Parses `name=value&name2=value2` (application/x-www-form-urlencoded).
/// Every pair needs a name and a non-empty value: a search parameter with an
/// empty value is ignored by FHIR search, which would silently lift the
/// restriction, so such a scope is refused instead.
fn parse_query(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .map(|pair| {
            let (name, value) = pair.split_once('=')?;
            let (name, value) = (form_decode(name)?, form_decode(value)?);
            (!name.is_empty() && !value.is_empty()).then_some((name, value))
        })
        .collect()
}

/// Decodes one form-encoded component: `+` is a space, `%XX` a byte, and the
/// bytes must be UTF-8.
fn form_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = text.get(i + 1..i + 3)?;
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Encodes one component as the URL Standard's urlencoded serializer does
/// (section 5.2): alphanumerics and `*-._` stay, space is `+`, the rest `%XX`.
fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(text: &str) -> Scope {
        Scope::parse(text).unwrap_or_else(|| panic!("{text} should parse"))
    }

    fn resource(text: &str) -> ResourceScope {
        match scope(text) {
            Scope::Resource(r) => r,
            other => panic!("{text} is not a resource scope: {other:?}"),
        }
    }

    fn set(text: &str) -> ScopeSet {
        ScopeSet::parse(text)
    }

    fn narrowed(requested: &str, allowed: &str) -> String {
        narrow(&set(requested), &set(allowed)).to_string()
    }

    // Parsing: v1

    #[test]
    fn v1_read_means_read_and_search() {
        let r = resource("patient/Observation.read");
        assert_eq!(r.context, Context::Patient);
        assert_eq!(r.resource_type.as_deref(), Some("Observation"));
        assert_eq!(r.permissions, Permissions::READ);
        assert!(r.v1);
        assert!(r.restrictions.is_empty());
    }

    #[test]
    fn v1_write_means_create_update_and_delete() {
        let r = resource("user/Patient.write");
        assert_eq!(r.context, Context::User);
        assert_eq!(r.permissions, Permissions::WRITE);
        assert!(r.v1);
    }

    #[test]
    fn v1_star_means_all_five_permissions() {
        let r = resource("system/Encounter.*");
        assert_eq!(r.context, Context::System);
        assert_eq!(r.permissions, Permissions::ALL);
        assert!(r.v1);
    }

    #[test]
    fn v1_wildcard_type_has_no_resource_type() {
        let r = resource("patient/*.read");
        assert_eq!(r.resource_type, None);
        assert_eq!(resource("user/*.*").permissions, Permissions::ALL);
        assert_eq!(resource("system/*.write").permissions, Permissions::WRITE);
    }

    #[test]
    fn every_v1_form_prints_back_as_written() {
        for context in ["patient", "user", "system"] {
            for ty in ["*", "Observation"] {
                for perms in ["read", "write", "*"] {
                    let text = format!("{context}/{ty}.{perms}");
                    assert_eq!(scope(&text).to_string(), text);
                }
            }
        }
    }

    #[test]
    fn v1_scope_with_a_restriction_is_rejected() {
        assert_eq!(
            Scope::parse("patient/Observation.read?category=laboratory"),
            None
        );
        assert_eq!(Scope::parse("patient/Observation.*?a=b"), None);
    }

    // Parsing: v2

    #[test]
    fn v2_letters_give_exactly_those_permissions() {
        let r = resource("patient/Observation.rs");
        assert_eq!(r.permissions, Permissions::READ);
        assert!(!r.v1);
        let r = resource("user/*.cud");
        assert_eq!(r.permissions, Permissions::WRITE);
        let r = resource("system/Patient.cruds");
        assert_eq!(r.permissions, Permissions::ALL);
        let r = resource("patient/Condition.s");
        assert_eq!(
            r.permissions,
            Permissions {
                search: true,
                ..Permissions::NONE
            }
        );
        let r = resource("patient/Condition.cd");
        assert_eq!(
            r.permissions,
            Permissions {
                create: true,
                delete: true,
                ..Permissions::NONE
            }
        );
    }

    #[test]
    fn every_v2_subsequence_of_cruds_parses_and_prints_back() {
        let letters = ['c', 'r', 'u', 'd', 's'];
        for mask in 1u8..32 {
            let perms: String = letters
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, c)| *c)
                .collect();
            let text = format!("user/Observation.{perms}");
            assert_eq!(scope(&text).to_string(), text);
        }
    }

    #[test]
    fn v2_letters_out_of_order_are_invalid() {
        assert_eq!(Scope::parse("patient/Observation.sr"), None);
        assert_eq!(Scope::parse("patient/Observation.rc"), None);
        assert_eq!(Scope::parse("patient/Observation.scrud"), None);
    }

    #[test]
    fn v2_repeated_letters_are_invalid() {
        assert_eq!(Scope::parse("patient/Observation.rr"), None);
        assert_eq!(Scope::parse("patient/Observation.crrs"), None);
    }

    #[test]
    fn empty_or_unknown_permissions_are_invalid() {
        assert_eq!(Scope::parse("patient/Observation."), None);
        assert_eq!(Scope::parse("patient/Observation"), None);
        assert_eq!(Scope::parse("patient/Observation.x"), None);
        assert_eq!(Scope::parse("patient/Observation.readwrite"), None);
        assert_eq!(Scope::parse("patient/Observation.R"), None);
    }

    #[test]
    fn unknown_context_or_type_is_not_a_resource_scope() {
        assert_eq!(Scope::parse("practitioner/Observation.rs"), None);
        assert_eq!(Scope::parse("patient/Observations.rs"), None);
        assert_eq!(Scope::parse("patient/observation.rs"), None);
        assert_eq!(Scope::parse("patient/Resource.rs"), None);
        assert_eq!(Scope::parse("patient/.rs"), None);
    }

    #[test]
    fn restrictions_are_parsed_and_decoded() {
        let r = resource(
            "patient/Observation.rs?category=laboratory&code=http%3A%2F%2Floinc.org%7C1234-5",
        );
        assert_eq!(
            r.restrictions,
            vec![
                ("category".to_owned(), "laboratory".to_owned()),
                ("code".to_owned(), "http://loinc.org|1234-5".to_owned()),
            ]
        );
        let r = resource("user/Observation.s?category=vital+signs");
        assert_eq!(
            r.restrictions,
            vec![("category".to_owned(), "vital signs".to_owned())]
        );
    }

    #[test]
    fn restrictions_round_trip_in_canonical_form() {
        for text in [
            "patient/Observation.rs?category=laboratory",
            "user/Observation.rs?category=laboratory&status=final",
            "patient/Observation.rs?code=http%3A%2F%2Floinc.org%7C1234-5",
            "system/*.s?_tag=a+b",
        ] {
            assert_eq!(scope(text).to_string(), text);
            assert_eq!(scope(&scope(text).to_string()), scope(text));
        }
    }

    #[test]
    fn restrictions_are_re_encoded_when_printed() {
        let s = scope("patient/Observation.rs?code=http://loinc.org|1234-5");
        assert_eq!(
            s.to_string(),
            "patient/Observation.rs?code=http%3A%2F%2Floinc.org%7C1234-5"
        );
    }

    #[test]
    fn malformed_restrictions_make_the_scope_invalid() {
        for text in [
            "patient/Observation.rs?",
            "patient/Observation.rs?category",
            "patient/Observation.rs?category=",
            "patient/Observation.rs?=laboratory",
            "patient/Observation.rs?a=1&&b=2",
            "patient/Observation.rs?a=%zz",
            "patient/Observation.rs?a=%4",
            "patient/Observation.rs?a=%FF",
        ] {
            assert_eq!(Scope::parse(text), None, "{text}");
        }
    }

    #[test]
    fn other_known_scopes_parse_and_print_back() {
        for (text, expected) in [
            ("openid", Scope::OpenId),
            ("fhirUser", Scope::FhirUser),
            ("profile", Scope::Profile),
            ("launch", Scope::Launch),
            ("launch/patient", Scope::LaunchPatient),
            ("launch/encounter", Scope::LaunchEncounter),
            ("offline_access", Scope::OfflineAccess),
            ("online_access", Scope::OnlineAccess),
        ] {
            assert_eq!(scope(text), expected);
            assert_eq!(expected.to_string(), text);
        }
    }

    #[test]
    fn unknown_scopes_do_not_parse() {
        for text in [
            "",
            "email",
            "OpenID",
            "launch/practitioner",
            "fhiruser",
            "*",
        ] {
            assert_eq!(Scope::parse(text), None, "{text}");
            assert!(text.parse::<Scope>().is_err());
        }
    }

    #[test]
    fn scope_set_drops_unknown_scopes_and_duplicates_keeping_order() {
        let s = set(
            "launch email patient/Observation.rs  openid patient/Foo.rs launch openid\tfhirUser",
        );
        assert_eq!(
            s.to_string(),
            "launch patient/Observation.rs openid fhirUser"
        );
        assert_eq!(s.len(), 4);
        assert!(s.contains_openid());
        assert!(s.has(&Scope::Launch));
        assert!(!s.has(&Scope::Profile));
    }

    #[test]
    fn scope_set_of_nothing_known_is_empty() {
        assert!(set("").is_empty());
        assert!(set("email address phone").is_empty());
        assert!(!set("profile").contains_openid());
    }

    #[test]
    fn scope_set_serializes_as_its_text() {
        let s = set("openid patient/Observation.rs");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"openid patient/Observation.rs\"");
        let back: ScopeSet = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn patient_scoped_needs_a_patient_resource_scope() {
        assert!(set("openid patient/Observation.rs").patient_scoped());
        assert!(!set("launch/patient user/Observation.rs").patient_scoped());
    }

    // Narrowing

    #[test]
    fn narrow_wildcard_request_to_the_allowed_type() {
        assert_eq!(
            narrowed("patient/*.rs", "patient/Observation.rs"),
            "patient/Observation.rs"
        );
    }

    #[test]
    fn narrow_wildcard_request_to_each_allowed_type() {
        assert_eq!(
            narrowed(
                "patient/*.rs",
                "patient/Observation.rs patient/Condition.r user/Patient.rs"
            ),
            "patient/Observation.rs patient/Condition.r"
        );
    }

    #[test]
    fn narrow_permissions_to_the_allowed_ones() {
        assert_eq!(
            narrowed("user/Observation.cruds", "user/*.rs"),
            "user/Observation.rs"
        );
    }

    #[test]
    fn narrow_keeps_a_requested_restriction() {
        assert_eq!(
            narrowed(
                "patient/Observation.rs?category=laboratory",
                "patient/Observation.rs"
            ),
            "patient/Observation.rs?category=laboratory"
        );
    }

    #[test]
    fn narrow_adds_an_allowed_restriction() {
        assert_eq!(
            narrowed(
                "patient/Observation.rs",
                "patient/Observation.rs?category=laboratory"
            ),
            "patient/Observation.rs?category=laboratory"
        );
    }

    #[test]
    fn narrow_keeps_contexts_apart() {
        assert_eq!(narrowed("patient/Observation.rs", "user/*.cruds"), "");
        assert_eq!(narrowed("user/Observation.rs", "system/*.cruds"), "");
        assert_eq!(narrowed("system/Observation.rs", "patient/*.cruds"), "");
    }

    #[test]
    fn narrow_drops_a_request_not_covered() {
        assert_eq!(
            narrowed(
                "patient/Condition.rs patient/Observation.c patient/Observation.rs",
                "patient/Observation.rs"
            ),
            "patient/Observation.rs"
        );
    }

    #[test]
    fn narrow_grants_openid_only_if_allowed() {
        assert_eq!(
            narrowed("openid fhirUser patient/*.rs", "patient/*.rs fhirUser"),
            "fhirUser patient/*.rs"
        );
        assert_eq!(
            narrowed("openid offline_access", "openid offline_access launch"),
            "openid offline_access"
        );
    }

    #[test]
    fn narrow_v1_request_stays_v1_when_v1_can_say_it() {
        assert_eq!(
            narrowed("patient/*.read", "patient/Observation.rs"),
            "patient/Observation.read"
        );
        assert_eq!(
            narrowed("user/Observation.*", "user/*.cruds"),
            "user/Observation.*"
        );
        assert_eq!(
            narrowed("user/Observation.*", "user/*.cud"),
            "user/Observation.write"
        );
    }

    #[test]
    fn narrow_v1_request_becomes_v2_when_v1_cannot_say_it() {
        assert_eq!(
            narrowed("patient/*.read", "patient/Observation.r"),
            "patient/Observation.r"
        );
        assert_eq!(
            narrowed(
                "patient/Observation.read",
                "patient/*.rs?category=laboratory"
            ),
            "patient/Observation.rs?category=laboratory"
        );
    }

    #[test]
    fn narrow_v2_request_stays_v2_against_v1_allowed() {
        assert_eq!(
            narrowed("patient/Observation.rs", "patient/*.read"),
            "patient/Observation.rs"
        );
    }

    #[test]
    fn narrow_merges_permissions_from_several_allowed_scopes() {
        assert_eq!(
            narrowed(
                "patient/Observation.read",
                "patient/Observation.r patient/*.s"
            ),
            "patient/Observation.read"
        );
    }

    #[test]
    fn narrow_leaves_out_results_covered_by_others() {
        assert_eq!(
            narrowed("patient/*.rs", "patient/*.rs patient/Observation.r"),
            "patient/*.rs"
        );
        assert_eq!(
            narrowed("patient/Observation.r patient/*.rs", "patient/*.cruds"),
            "patient/*.rs"
        );
    }

    #[test]
    fn narrow_of_a_subset_is_itself() {
        let requested = "openid patient/Observation.rs?category=laboratory user/*.read";
        assert_eq!(
            narrowed(
                requested,
                "openid fhirUser patient/*.cruds user/*.* offline_access"
            ),
            requested
        );
    }

    #[test]
    fn narrow_result_is_within_both_sides() {
        let requested = set("patient/*.cruds user/Observation.read openid launch");
        let allowed =
            set("patient/Observation.rs?category=laboratory patient/Condition.cu user/*.rs openid");
        let granted = narrow(&requested, &allowed);
        assert!(is_within(&granted, &requested));
        assert!(is_within(&granted, &allowed));
    }

    // Refresh: is_within

    #[test]
    fn refresh_may_narrow_permissions_or_types() {
        let original = set("openid patient/*.rs offline_access");
        assert!(is_within(&set("patient/Observation.rs"), &original));
        assert!(is_within(&set("patient/*.r openid"), &original));
        assert!(is_within(&set("patient/Observation.read"), &original));
        assert!(is_within(&set(""), &original));
        assert!(is_within(&original, &original));
    }

    #[test]
    fn refresh_may_not_widen() {
        let original = set("openid patient/Observation.rs");
        assert!(!is_within(&set("patient/Observation.cruds"), &original));
        assert!(!is_within(&set("patient/*.rs"), &original));
        assert!(!is_within(&set("user/Observation.rs"), &original));
        assert!(!is_within(&set("openid offline_access"), &original));
    }

    #[test]
    fn refresh_may_add_a_restriction() {
        let original = set("patient/Observation.rs");
        assert!(is_within(
            &set("patient/Observation.rs?category=laboratory"),
            &original
        ));
    }

    #[test]
    fn refresh_may_not_remove_a_restriction() {
        let original = set("patient/Observation.rs?category=laboratory");
        assert!(!is_within(&set("patient/Observation.rs"), &original));
        assert!(!is_within(
            &set("patient/Observation.rs?category=vital-signs"),
            &original
        ));
    }

    #[test]
    fn permissions_split_over_several_scopes_still_cover() {
        let original = set("patient/Observation.r patient/*.s");
        assert!(is_within(&set("patient/Observation.rs"), &original));
        assert!(!is_within(&set("patient/Condition.rs"), &original));
    }

    // Evaluation

    #[test]
    fn grants_for_matches_a_wildcard_type() {
        let s = set("patient/*.rs");
        let grants = s.grants_for("Observation", Permission::Read);
        assert_eq!(
            grants,
            vec![Grant {
                context: Context::Patient,
                restrictions: &[]
            }]
        );
    }

    #[test]
    fn grants_for_matches_only_its_own_type() {
        let s = set("user/Observation.rs?category=laboratory");
        let grants = s.grants_for("Observation", Permission::Search);
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].context, Context::User);
        assert_eq!(
            grants[0].restrictions,
            &[("category".to_owned(), "laboratory".to_owned())]
        );
        assert!(s.grants_for("Condition", Permission::Search).is_empty());
    }

    #[test]
    fn grants_for_refuses_a_missing_permission() {
        let s = set("patient/*.rs openid");
        assert!(s.grants_for("Observation", Permission::Create).is_empty());
        assert!(s.grants_for("Observation", Permission::Update).is_empty());
        assert!(s.grants_for("Observation", Permission::Delete).is_empty());
    }

    #[test]
    fn grants_for_lists_every_matching_scope() {
        let s = set("patient/Observation.r user/*.read system/Condition.r");
        let contexts: Vec<Context> = s
            .grants_for("Observation", Permission::Read)
            .iter()
            .map(|g| g.context)
            .collect();
        assert_eq!(contexts, vec![Context::Patient, Context::User]);
    }

    #[test]
    fn permissions_contain_and_intersect() {
        assert!(Permissions::ALL.contains(&Permissions::READ));
        assert!(!Permissions::READ.contains(&Permissions::WRITE));
        assert!(Permissions::READ.contains(&Permissions::NONE));
        assert_eq!(
            Permissions::READ.intersect(&Permissions::WRITE),
            Permissions::NONE
        );
        assert_eq!(
            Permissions::ALL.intersect(&Permissions::READ),
            Permissions::READ
        );
    }

    // Consent words

    #[test]
    fn describe_resource_scopes_in_plain_words() {
        for (text, words) in [
            (
                "patient/Observation.rs",
                "Read and search your Observation records",
            ),
            ("patient/*.read", "Read and search all your records"),
            (
                "user/*.cruds",
                "Create, read, update, delete and search all data you can access",
            ),
            (
                "user/Patient.write",
                "Create, update and delete Patient records you can access",
            ),
            ("system/*.rs", "Read and search all data on this server"),
            (
                "system/Encounter.r",
                "Read all Encounter records on this server",
            ),
            (
                "patient/Observation.rs?category=laboratory",
                "Read and search your Observation records where category is laboratory",
            ),
            (
                "patient/Observation.s?category=laboratory&status=final",
                "Search your Observation records where category is laboratory and status is final",
            ),
        ] {
            assert_eq!(scope(text).describe(), words, "{text}");
        }
    }

    #[test]
    fn describe_other_scopes_in_plain_words() {
        for (text, words) in [
            ("openid", "Confirm that it is you who signed in"),
            ("fhirUser", "Know which person's record is yours"),
            ("profile", "See your name and profile"),
            ("launch", "Receive the context from the launching system"),
            ("launch/patient", "Know which patient record is open"),
            ("launch/encounter", "Know which encounter is open"),
            ("offline_access", "Stay connected when you are not using it"),
            ("online_access", "Stay connected while you are signed in"),
        ] {
            assert_eq!(scope(text).describe(), words, "{text}");
        }
    }

    #[test]
    fn describe_a_set_without_repeats() {
        assert_eq!(
            set("profile openid profile").describe(),
            vec![
                "See your name and profile",
                "Confirm that it is you who signed in"
            ]
        );
    }
}
