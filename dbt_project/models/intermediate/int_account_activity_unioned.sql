-- Activity from every source; when a record arrives twice (the core extract and a landed
-- file), the most recently loaded copy wins.
with

core as (
    select * from {{ ref('stg_generator__account_activity') }}
),

landed as (
    select * from {{ ref('stg_landing__account_activity') }}
),

unioned as (
    select * from core
    union all
    select * from landed
),

deduplicated as (
    select *
    from unioned
    qualify row_number() over (
        partition by account_id, activity_date order by loaded_at desc, source_system
    ) = 1
)

select * from deduplicated
