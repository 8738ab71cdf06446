-- Activity from every source, one row per account and day. A record that also arrived as a
-- landed file (a late correction) replaces the core system's copy; among landed copies the
-- most recently loaded wins. Validation already removed duplicates within each delivery, so
-- only the small landed set needs deduplicating.
with

core as (
    select * from {{ ref('stg_generator__account_activity') }}
),

landed as (
    select * from {{ ref('stg_landing__account_activity') }}
    qualify row_number() over (
        partition by account_id, activity_date order by loaded_at desc
    ) = 1
),

core_not_landed as (
    select core.*
    from core
    anti join landed
        on core.account_id = landed.account_id and core.activity_date = landed.activity_date
),

unioned as (
    select * from core_not_landed
    union all
    select * from landed
)

select * from unioned
