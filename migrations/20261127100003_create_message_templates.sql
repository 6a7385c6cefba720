-- WhatsApp message templates as registered with Meta: the components keep their {{n}}
-- placeholders; the parameter counts are derived once, when the template is registered.
create table message_templates (
    tenant_id         uuid not null references tenants (id),
    id                uuid not null,
    name              text not null,
    language          text not null,
    components        jsonb not null,
    header_params     int not null,
    body_params       int not null,
    button_url_params int[] not null,
    created_at        timestamptz not null default now(),
    primary key (tenant_id, id),
    constraint message_templates_one_per_language unique (tenant_id, name, language),
    constraint message_templates_counts check (header_params >= 0 and body_params >= 0)
);
