//! OpenAPI component schemas generated from the types.

use utoipa::ToSchema;
use utoipa::openapi::schema::Schema;
use utoipa::openapi::{Components, ComponentsBuilder, RefOr};

use crate::clone::VirtualMachineClone;
use crate::event::Event;
use crate::host::Host;
use crate::image::Image;
use crate::kubevirt::{VirtualMachine, VirtualMachineInstance};
use crate::meta::{Condition, ObjectMeta};
use crate::migration::{MigrationPolicy, VirtualMachineInstanceMigration};
use crate::network::{Network, SecurityGroup};
use crate::snapshot::{
    VirtualMachineRestore, VirtualMachineSnapshot, VirtualMachineSnapshotContent,
};
use crate::storage::{StoragePool, StorageVolume};
use crate::webhook::Webhook;

fn add<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
}

/// Every served kind's schema (named by [`crate::KindInfo::schema_name`])
/// and every type they reference, ready for `#/components/schemas/…`.
pub fn openapi_components() -> Components {
    let mut schemas = Vec::new();
    add::<VirtualMachine>(&mut schemas);
    add::<VirtualMachineInstance>(&mut schemas);
    add::<Host>(&mut schemas);
    add::<Image>(&mut schemas);
    add::<Network>(&mut schemas);
    add::<SecurityGroup>(&mut schemas);
    add::<VirtualMachineSnapshot>(&mut schemas);
    add::<VirtualMachineRestore>(&mut schemas);
    add::<VirtualMachineSnapshotContent>(&mut schemas);
    add::<VirtualMachineClone>(&mut schemas);
    add::<StoragePool>(&mut schemas);
    add::<StorageVolume>(&mut schemas);
    add::<Event>(&mut schemas);
    add::<Webhook>(&mut schemas);
    add::<crate::auth::Namespace>(&mut schemas);
    add::<crate::auth::ResourceQuota>(&mut schemas);
    add::<crate::auth::Role>(&mut schemas);
    add::<crate::auth::ClusterRole>(&mut schemas);
    add::<crate::auth::RoleBinding>(&mut schemas);
    add::<crate::auth::ClusterRoleBinding>(&mut schemas);
    add::<crate::auth::Token>(&mut schemas);
    add::<VirtualMachineInstanceMigration>(&mut schemas);
    add::<MigrationPolicy>(&mut schemas);
    add::<crate::instancetype::VirtualMachineInstancetype>(&mut schemas);
    add::<crate::instancetype::VirtualMachineClusterInstancetype>(&mut schemas);
    add::<crate::instancetype::VirtualMachinePreference>(&mut schemas);
    add::<crate::instancetype::VirtualMachineClusterPreference>(&mut schemas);
    add::<crate::template::Template>(&mut schemas);
    add::<crate::template::TemplateInstance>(&mut schemas);
    add::<ObjectMeta>(&mut schemas);
    add::<Condition>(&mut schemas);
    ComponentsBuilder::new().schemas_from_iter(schemas).build()
}
