"""Expert knowledge about diabetic retinopathy grades, fundus pathologies and image quality.

Plain data, in the spirit of FLAIR's `flair/modeling/dictionary.py` ("mild diabetic retinopathy" ->
"only few microaneurysms"): for every grade of the two grading schemes BRSET uses (ICDR 0-4 and SDRG
R0-R4, where BRSET's R4 means proliferative *or* post-laser) several paraphrases of the grade's name and
several expert descriptions of what a grader sees, plus descriptions of BRSET's pathology flags, the
anatomical assessments, image-quality defects and expansions of the free-text comorbidities.

The narratives (`training.text.narratives`) draw from these tables. Two rules keep the text unambiguous, so that a
narrative can be checked against its record:

- Only a grade's own entries use the words "mild", "moderate", "severe", "background",
  "proliferative" or "NPDR"/"PDR", and a grade number only appears as "ICDR ... N" or "grade N" (ICDR)
  and "R N" (SDRG). Descriptions of other grades therefore never name a grade.
- The text is written in British spelling ("haemorrhage", "oedema", "neovascularisation");
  `AMERICAN_SPELLINGS` maps it to American spelling for narratives that use it.
"""

from __future__ import annotations

ICDR_GRADE_NAMES: dict[int, tuple[str, ...]] = {
    0: (
        "no diabetic retinopathy",
        "no DR",
        "no apparent diabetic retinopathy",
        "no signs of diabetic retinopathy",
    ),
    1: ("mild non-proliferative diabetic retinopathy", "mild NPDR", "mild non-proliferative DR"),
    2: ("moderate non-proliferative diabetic retinopathy", "moderate NPDR", "moderate non-proliferative DR"),
    3: ("severe non-proliferative diabetic retinopathy", "severe NPDR", "severe non-proliferative DR"),
    4: ("proliferative diabetic retinopathy", "PDR", "proliferative DR"),
}
"""Paraphrases of each ICDR grade's name (the first is `records.ICDR_NAMES[grade]`)."""

ICDR_DESCRIPTIONS: dict[int, tuple[str, ...]] = {
    0: (
        "no microaneurysms or other diabetic lesions",
        "no abnormalities attributable to diabetes",
        "no diabetic lesions",
        "no microaneurysms, no dot or blot haemorrhages and no exudates of diabetic origin",
    ),
    1: (
        "only a few microaneurysms",
        "microaneurysms only",
        "isolated microaneurysms without other lesions",
        "a small number of microaneurysms and nothing more",
    ),
    2: (
        "more than just microaneurysms, with dot and blot haemorrhages",
        "dot and blot haemorrhages, hard exudates and cotton-wool spots, not meeting the 4-2-1 rule",
        "microaneurysms with scattered intraretinal haemorrhages and hard exudates",
        "haemorrhages, hard exudates or cotton-wool spots beyond microaneurysms alone, "
        "short of the 4-2-1 criteria",
    ),
    3: (
        "more than 20 intraretinal haemorrhages in each of four quadrants",
        "venous beading in two or more quadrants",
        "prominent IRMA in one or more quadrants, with no signs of proliferation",
        "findings meeting the 4-2-1 rule: haemorrhages in four quadrants, venous beading in two "
        "or IRMA in one, without new vessels",
    ),
    4: (
        "neovascularisation of the disc or elsewhere",
        "new vessels (NVD or NVE)",
        "vitreous or pre-retinal haemorrhage",
        "neovascularisation, pre-retinal haemorrhage or laser photocoagulation scars",
        "laser photocoagulation scars from previous treatment of new vessels",
    ),
}
"""Expert descriptions of what each ICDR grade looks like (the grade's definition, paraphrased)."""

SDRG_GRADE_NAMES: dict[int, tuple[str, ...]] = {
    0: ("no retinopathy",),
    1: ("background retinopathy", "background diabetic changes"),
    2: ("pre-proliferative retinopathy in one hemi-field", "pre-proliferative retinopathy"),
    3: ("pre-proliferative retinopathy in both hemi-fields", "pre-proliferative retinopathy"),
    4: ("proliferative retinopathy or post-laser", "proliferative or post-laser retinopathy"),
}
"""Paraphrases of each SDRG grade's name; the narratives always pair them with the code "R0".."R4"."""

SDRG_DESCRIPTIONS: dict[int, tuple[str, ...]] = {
    0: ("no diabetic lesions of any kind", "no microaneurysms, haemorrhages or exudates"),
    1: (
        "microaneurysms, retinal haemorrhages or any exudate",
        "background changes: microaneurysms, haemorrhages and exudates",
    ),
    2: (
        "four or more blot haemorrhages in one hemi-field only",
        "at least four blot haemorrhages confined to one hemi-field",
    ),
    3: (
        "four or more blot haemorrhages in both the superior and inferior hemi-fields, venous beading, "
        "or IRMA",
        "blot haemorrhages in both hemi-fields, venous beading or IRMA",
    ),
    4: (
        "new vessels, pre-retinal or vitreous haemorrhage, or post-laser",
        "new vessels or laser photocoagulation scars",
    ),
}
"""Expert descriptions of each SDRG grade as BRSET codes it."""

PATHOLOGY_PRESENT: dict[str, tuple[str, ...]] = {
    "diabetic_retinopathy": ("signs of diabetic retinopathy", "diabetic retinal changes"),
    "macular_edema": (
        "macular oedema",
        "macular oedema with retinal thickening near the fovea",
        "exudates and thickening at the macula consistent with macular oedema",
    ),
    "scar": ("a chorioretinal scar", "a pigmented retinal scar", "an atrophic chorioretinal scar"),
    "nevus": ("a choroidal naevus", "a flat pigmented choroidal naevus"),
    "amd": (
        "age-related macular degeneration",
        "changes of age-related macular degeneration (AMD)",
        "degenerative macular changes consistent with AMD",
    ),
    "vascular_occlusion": (
        "a retinal vascular occlusion",
        "signs of retinal vein or artery occlusion",
        "a retinal vascular occlusion with haemorrhages along the affected vessel",
    ),
    "hypertensive_retinopathy": (
        "hypertensive retinopathy",
        "arteriolar narrowing and arteriovenous nicking consistent with hypertensive retinopathy",
    ),
    "drusen": ("drusen", "scattered yellow drusen", "drusen at the posterior pole"),
    "hemorrhage": ("retinal haemorrhages", "intraretinal haemorrhage"),
    "retinal_detachment": ("a retinal detachment", "an area of detached retina"),
    "myopic_fundus": (
        "a myopic fundus",
        "myopic changes with a tessellated fundus and peripapillary atrophy",
    ),
    "increased_cup_disc": (
        "an increased cup-to-disc ratio",
        "an enlarged optic cup (glaucoma suspect)",
        "increased optic disc cupping",
    ),
    "other": ("another fundus abnormality", "an additional unspecified fundus finding"),
}
"""Descriptions of each BRSET pathology flag when it is set (noun phrases)."""

PATHOLOGY_ABSENT: dict[str, tuple[str, ...]] = {
    "macular_edema": (
        "no macular oedema",
        "no signs of macular oedema",
        "no clinically evident macular oedema",
    ),
    "retinal_detachment": ("no retinal detachment",),
    "amd": ("no signs of age-related macular degeneration",),
    "drusen": ("no drusen",),
    "increased_cup_disc": ("a normal cup-to-disc ratio",),
}
"""Negative statements for the flags whose absence a report might mention.

`hemorrhage` has none on purpose: BRSET's flag is unset for many DR cases whose grade description
mentions haemorrhages, so "no haemorrhages" would contradict the grade.
"""

ASSESSMENT_ABNORMAL: dict[str, tuple[str, ...]] = {
    "optic_disc": (
        "an abnormal optic disc",
        "abnormal optic disc appearance",
        "an atypical optic nerve head",
    ),
    "vessels": ("abnormal retinal vessels", "vascular abnormalities (attenuated or tortuous vessels)"),
    "macula": ("an abnormal macula", "abnormal macular appearance"),
    "focus": ("an out-of-focus image", "a blurred image", "poor focus"),
    "illumination": ("uneven illumination", "a poorly illuminated image", "illumination defects"),
    "image_field": (
        "an inadequate image field",
        "an off-centre field of view",
        "an incomplete field (disc or macula not fully captured)",
    ),
    "artifacts": (
        "imaging artefacts",
        "artefacts (dust, eyelash or reflections)",
        "artefacts obscuring part of the image",
    ),
}
"""Descriptions of each `records.ASSESSMENT_FIELDS` field when it is abnormal (noun phrases)."""

ASSESSMENT_NORMAL: dict[str, tuple[str, ...]] = {
    "optic_disc": ("a normal optic disc", "a healthy-looking optic disc"),
    "vessels": ("normal retinal vessels", "normal vascular calibre"),
    "macula": ("a normal macula", "normal macular appearance"),
    "focus": ("good focus",),
    "illumination": ("even illumination",),
    "image_field": ("a well-centred field",),
    "artifacts": ("no artefacts",),
}
"""Descriptions of each `records.ASSESSMENT_FIELDS` field when it is normal (noun phrases)."""

QUALITY: dict[bool, tuple[str, ...]] = {
    True: ("adequate image quality", "a good-quality image", "gradable, adequate quality"),
    False: ("inadequate image quality", "a poor-quality photograph", "image quality judged inadequate"),
}
"""Overall image quality: `quality_adequate` True / False."""

COMORBIDITY_EXPANSIONS: dict[str, tuple[str, ...]] = {
    "sah": ("systemic arterial hypertension", "arterial hypertension", "hypertension"),
    "diabetes": ("diabetes mellitus", "diabetes"),
    "diabetes1": ("type 1 diabetes", "type 1 diabetes mellitus"),
    "hypothyroidism": ("hypothyroidism",),
    "hipoitireoidismo": ("hypothyroidism",),
    "hypercholesterolemia": ("hypercholesterolaemia", "high cholesterol"),
    "hipocolesterolemia": ("hypocholesterolaemia",),
    "dyslipidemia": ("dyslipidaemia",),
    "hypertriglyceridemia": ("hypertriglyceridaemia",),
    "cardiopathy": ("heart disease", "cardiopathy"),
    "arrhythmia": ("cardiac arrhythmia", "arrhythmia"),
    "acute myocardium infarct": ("previous myocardial infarction", "past heart attack"),
    "cardiac insufficiency": ("heart failure",),
    "valvulopathy": ("valvular heart disease",),
    "encephalic vascular accident": ("previous stroke", "past cerebrovascular accident"),
    "cerebrovascular accident": ("previous stroke",),
    "lupus": ("systemic lupus erythematosus", "lupus"),
    "rheumatoid arthritis": ("rheumatoid arthritis",),
    "chloroquine": ("chloroquine use",),
    "hydroxychloroquine": ("hydroxychloroquine use",),
    "hydroxichloroquine": ("hydroxychloroquine use",),
    "chronic kidney disease": ("chronic kidney disease", "CKD"),
    "human immunodeficiency virus": ("HIV infection", "HIV"),
    "chronic obstructive pulmonary disease": ("COPD", "chronic obstructive pulmonary disease"),
    "dpoc": ("COPD",),
    "parkinson": ("Parkinson's disease",),
    "parkison": ("Parkinson's disease",),
    "alzheimer": ("Alzheimer's disease",),
    "chron disease": ("Crohn's disease",),
    "sjogren": ("Sjogren's syndrome",),
    "behcet": ("Behcet's disease",),
    "devic": ("neuromyelitis optica (Devic's disease)",),
    "tabagism": ("smoking", "tobacco use"),
    "epilepsia": ("epilepsy",),
    "trombose": ("thrombosis",),
    "deep vascular thrombosis": ("deep vein thrombosis",),
    "leucemia": ("leukaemia",),
    "talassemia": ("thalassaemia",),
    "thalassemia": ("thalassaemia",),
    "policitemia vera": ("polycythaemia vera",),
    "sickle cell anemia": ("sickle cell anaemia",),
    "anemia": ("anaemia",),
    "multiple sclerosiss": ("multiple sclerosis",),
    "hashimoto disease": ("Hashimoto's thyroiditis",),
    "graves disease": ("Graves' disease",),
    "mccune albright": ("McCune-Albright syndrome",),
    "down syndrome": ("Down syndrome",),
    "chagas": ("Chagas disease",),
    "chagas disease": ("Chagas disease",),
}
"""Expansions of BRSET's comorbidity tokens (lower-cased keys): abbreviations, Portuguese spellings and
misspellings. Tokens not listed are used as written."""

COMORBIDITY_NONE: frozenset[str] = frozenset({"0", "none", "no", "nao", "não", "nenhuma"})
"""Comorbidity values that mean "none reported" (BRSET writes `0`)."""

COMORBIDITY_MISSING: frozenset[str] = frozenset({"", "na", "nan", "null", "n/a"})
"""Comorbidity values that mean the field is missing."""


def comorbidity_tokens(raw: str | None) -> list[str] | None:
    """BRSET's free-text comorbidities (comma-separated) as lower-cased tokens, as written: None when
    missing, [] when only "none" is reported. The one tokeniser of that column (tabular features and
    narratives both read it through here). Raises ValueError for a value that is not text."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ValueError(f"comorbidities: expected text, got {raw!r}")
    tokens = [t.strip().lower() for t in raw.split(",")]
    tokens = [t for t in tokens if t not in COMORBIDITY_MISSING]
    if not tokens:
        return None
    return [t for t in tokens if t not in COMORBIDITY_NONE]


def canonical_comorbidities(raw: str | None) -> list[str] | None:
    """`comorbidity_tokens` with spelling variants (Portuguese, typos) folded onto their first expansion
    (e.g. hipoitireoidismo -> hypothyroidism), sorted and without repeats."""
    tokens = comorbidity_tokens(raw)
    if tokens is None:
        return None
    return sorted({COMORBIDITY_EXPANSIONS[t][0] if t in COMORBIDITY_EXPANSIONS else t for t in tokens})


DIABETES_TOKENS: dict[str, str | None] = {"diabetes": None, "diabetes1": "1", "diabetes2": "2"}
"""Comorbidity tokens that name diabetes itself, with the type they state (None = type not stated)."""

AMERICAN_SPELLINGS: tuple[tuple[str, str], ...] = (
    ("haemorrhag", "hemorrhag"),
    ("oedema", "edema"),
    ("naev", "nev"),
    ("isation", "ization"),
    ("colour", "color"),
    ("artefact", "artifact"),
    ("centred", "centered"),
    ("centre", "center"),
    ("calibre", "caliber"),
    ("leukaemi", "leukemi"),
    ("ythaemi", "ythemi"),
    ("anaemi", "anemi"),
    ("olaemi", "olemi"),
    ("idaemi", "idemi"),
    ("assaemi", "assemi"),
)
"""British -> American spelling stems (applied to lower-case and capitalised forms)."""

ABBREVIATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("microaneurysms", ("MAs", "micro-aneurysms")),
    ("cotton-wool spots", ("cotton wool spots", "soft exudates")),
    ("IRMA", ("intraretinal microvascular abnormalities",)),
)
"""Terms a narrative may write in another form throughout (a synonym or an abbreviation)."""
